#!/usr/bin/env python3
"""Export your OpenAI fine-tuning work into a folder that `tunehouse migrate openai` reads.

Run it where OpenAI is still reachable, with the official SDK (`pip install openai`) and your key:

    OPENAI_API_KEY=sk-... python scripts/export_from_openai.py openai-export/

It writes (and only reads from OpenAI; nothing there changes):

    openai-export/
      manifest.json   {"format": "openai-fine-tuning-export", "version": 1, "exported_at": <unix s>,
                       "files": [{"id", "filename", "purpose", "bytes", "created_at"}, ...]}
      files/<file id>.jsonl   each file's contents: every training and validation file of a job
      jobs.json       [{"id", "model", "fine_tuned_model", "status", "training_file",
                        "validation_file", "method", "suffix", "seed", "metadata", "integrations",
                        "created_at"}, ...]   every fine-tuning job (method: type + its hyperparameters)
      evals.json      [{"id", "name", "data_source_config", "testing_criteria", "metadata",
                        "created_at"}, ...]   every eval definition (not its runs)

The layout is documented in the README ("Moving from OpenAI fine-tuning"). Options:
--no-evals skips the evals; --job ID (repeatable) exports only those jobs (and their files).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FORMAT, VERSION = "openai-fine-tuning-export", 1


def _plain(obj):
    """An SDK object (or dict) as plain JSON, without null members (the SDK fills unset ones)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", exclude_none=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _suffix(job) -> str | None:
    """The job's suffix: OpenAI sends `user_provided_suffix`; else the 4th part of its model name
    (ft:<base>:<org>:<suffix>:<id>)."""
    given = (job.model_extra or {}).get("user_provided_suffix")
    if given or not job.fine_tuned_model:
        return given
    parts = job.fine_tuned_model.split(":")
    return (parts[3] or None) if len(parts) == 5 else None


def export_job(job) -> dict:
    method = _plain(job.method) if job.method else None
    if method is None:  # jobs from before `method` existed: supervised with top-level hyperparameters
        method = {"type": "supervised", "supervised": {"hyperparameters": _plain(job.hyperparameters) or {}}}
    return {
        "id": job.id,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "method": method,
        "suffix": _suffix(job),
        "seed": job.seed,
        "metadata": job.metadata,
        "integrations": _plain(job.integrations) if job.integrations else None,
        "created_at": job.created_at,
    }


def export_eval(ev) -> dict:
    return {
        "id": ev.id,
        "name": ev.name,
        "data_source_config": _plain(ev.data_source_config),
        "testing_criteria": _plain(ev.testing_criteria),
        "metadata": ev.metadata,
        "created_at": ev.created_at,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (created; must be empty)")
    parser.add_argument("--job", action="append", help="export only this job id (repeatable)")
    parser.add_argument("--no-evals", action="store_true", help="do not export eval definitions")
    args = parser.parse_args(argv)

    from openai import OpenAI  # the official SDK; reads OPENAI_API_KEY (and OPENAI_BASE_URL)

    client = OpenAI()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} is not empty", file=sys.stderr)
        return 1
    (args.out / "files").mkdir(parents=True, exist_ok=True)

    if args.job:
        jobs = [client.fine_tuning.jobs.retrieve(j) for j in args.job]
    else:
        jobs = list(client.fine_tuning.jobs.list(limit=100))  # the SDK pages through all of them
    exported_jobs = [export_job(j) for j in jobs]
    print(f"{len(exported_jobs)} fine-tuning job(s)")

    file_ids = sorted({f for j in exported_jobs for f in (j["training_file"], j["validation_file"]) if f})
    files = []
    for file_id in file_ids:
        meta = client.files.retrieve(file_id)
        data = client.files.content(file_id).read()
        (args.out / "files" / f"{file_id}.jsonl").write_bytes(data)
        files.append(
            {
                "id": meta.id,
                "filename": meta.filename,
                "purpose": meta.purpose,
                "bytes": len(data),
                "created_at": meta.created_at,
            }
        )
        print(f"  {file_id} {meta.filename} ({len(data):,} bytes)")

    evals = [] if args.no_evals else [export_eval(e) for e in client.evals.list(limit=100)]
    print(f"{len(evals)} eval(s)")

    (args.out / "jobs.json").write_text(json.dumps(exported_jobs, indent=2))
    (args.out / "evals.json").write_text(json.dumps(evals, indent=2))
    # The manifest last: a folder with one is complete.
    manifest = {"format": FORMAT, "version": VERSION, "exported_at": int(time.time()), "files": files}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"Wrote {args.out}. Next: tunehouse migrate openai {args.out} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
