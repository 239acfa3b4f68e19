"""`tunehouse migrate openai`: read an export folder (scripts/export_from_openai.py), check all of
it, plan, and create what the plan says through the same services the API uses.

The folder (documented in the README, "Moving from OpenAI fine-tuning"):

    manifest.json          {"format": "openai-fine-tuning-export", "version": 1, "exported_at": …,
                            "files": [{"id", "filename", "purpose", "bytes", "created_at"}]}
    files/<file id>.jsonl  each file's bytes
    jobs.json              [{"id", "model", "fine_tuned_model", "status", "training_file",
                             "validation_file", "method", "suffix", "seed", "metadata",
                             "integrations", "created_at"}]
    evals.json             [{"id", "name", "data_source_config", "testing_criteria", "metadata",
                             "created_at"}]

What it becomes here:
- each file: a file of the organization (its default project), same name and purpose;
- each succeeded job: a new job on the chosen base with the same method, hyperparameters, suffix,
  seed and metadata, reading the re-uploaded files; jobs that did not succeed are skipped (they
  left no model to replace); a job that continued an `ft:` model waits until that model's
  replacement has succeeded (run the command again then);
- each eval: an eval with the same name, metadata, data source config and testing criteria;
- each old `ft:` model name: a model alias whose target is its replacement job's id, so it answers
  with the job's fine-tuned model once the job has succeeded (api/aliases).

Everything is read and checked before anything is created (the data of every job with the base's
tokenizer, every body with the API's own request models and checks, the quotas); any problem is
reported with where it is, and nothing is created. What is created is recorded (table
`migration_imports`, keyed by the OpenAI id) in the same commit, so a second run creates nothing
twice and a run cut short carries on where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

FORMAT, VERSION = "openai-fine-tuning-export", 1
SOURCE = "openai"

MANIFEST_KEYS = {"format": True, "version": True, "exported_at": False, "files": True}
FILE_KEYS = {"id": True, "filename": True, "purpose": True, "bytes": True, "created_at": False}
JOB_KEYS = {
    "id": True,
    "model": True,
    "fine_tuned_model": False,
    "status": True,
    "training_file": True,
    "validation_file": False,
    "method": True,
    "suffix": False,
    "seed": False,
    "metadata": False,
    "integrations": False,
    "created_at": False,
}
EVAL_KEYS = {
    "id": True,
    "name": False,
    "data_source_config": True,
    "testing_criteria": True,
    "metadata": False,
    "created_at": False,
}


class ExportProblems(Exception):
    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


@dataclass
class Export:
    folder: Path
    files: list[dict]
    jobs: list[dict]
    evals: list[dict]

    def file(self, file_id: str) -> dict | None:
        return next((f for f in self.files if f["id"] == file_id), None)

    def path(self, file_id: str) -> Path:
        return self.folder / "files" / f"{file_id}.jsonl"


@dataclass
class Step:
    kind: str  # file | eval | job | alias
    source_id: str  # the OpenAI id (the old model name for an alias)
    action: str  # create | exists | skip | wait
    local_id: str | None = None  # the id here (chosen now for a create)
    note: str = ""
    body: dict = field(default_factory=dict)
    estimate: dict | None = None  # jobs: the data check's billable tokens, cost, seconds


@dataclass
class Plan:
    base: str
    steps: list[Step]
    warnings: list[str]

    def of(self, kind: str) -> list[Step]:
        return [s for s in self.steps if s.kind == kind]

    @property
    def creates(self) -> list[Step]:
        return [s for s in self.steps if s.action == "create"]


# --- reading -------------------------------------------------------------------------------------


# The type of each plain field wherever it appears (objects such as `method` are checked by the
# API's own request models).
TYPES: dict[str, type] = {
    "format": str,
    "version": int,
    "exported_at": int,
    "id": str,
    "filename": str,
    "purpose": str,
    "bytes": int,
    "created_at": int,
    "model": str,
    "fine_tuned_model": str,
    "status": str,
    "training_file": str,
    "validation_file": str,
    "suffix": str,
    "seed": int,
    "name": str,
    "files": list,
    "testing_criteria": list,
    "data_source_config": dict,
    "method": dict,
    "metadata": dict,
    "integrations": list,
}


def _keys(obj: Any, spec: dict[str, bool], where: str, problems: list[str]) -> bool:
    """Whether `obj` is an object whose fields are all known, present when required and of their
    type (every problem is added to `problems`)."""
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    ok = True
    for k, v in obj.items():
        if k not in spec:
            problems.append(f"{where}: unknown field '{k}' (known: {', '.join(spec)})")
            ok = False
        elif v is not None and (not isinstance(v, TYPES[k]) or (TYPES[k] is int and isinstance(v, bool))):
            problems.append(f"{where}: '{k}' must be {TYPES[k].__name__}, got {type(v).__name__}")
            ok = False
    for k, required in spec.items():
        if required and obj.get(k) is None:
            problems.append(f"{where}: missing required field '{k}'")
            ok = False
    return ok


def _load(folder: Path, name: str, problems: list[str]) -> Any:
    path = folder / name
    if not path.is_file():
        problems.append(f"{name}: missing (the export script writes it)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{name}: not UTF-8 text")
    except json.JSONDecodeError as e:
        problems.append(f"{name}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")
    return None


def read_export(folder: Path) -> Export:
    """The export folder, every part checked against the layout; all problems reported at once."""
    problems: list[str] = []
    if not folder.is_dir():
        raise ExportProblems([f"{folder}: not a folder"])
    manifest = _load(folder, "manifest.json", problems)
    jobs = _load(folder, "jobs.json", problems)
    evals = _load(folder, "evals.json", problems)
    files: list[dict] = []
    if manifest is not None:
        _keys(manifest, MANIFEST_KEYS, "manifest.json", problems)
    if isinstance(manifest, dict):
        if manifest.get("format") != FORMAT:
            problems.append(f"manifest.json: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            problems.append(f"manifest.json: 'version' {manifest.get('version')!r} is not supported (1 is)")
        if isinstance(manifest.get("files"), list):
            for i, f in enumerate(manifest["files"]):
                where = f"manifest.json files[{i}]"
                if _keys(f, FILE_KEYS, where, problems):
                    files.append(f)
                    _check_file(folder, f, where, problems)
            seen = [f["id"] for f in files]
            for dup in sorted({i for i in seen if seen.count(i) > 1}):
                problems.append(f"manifest.json: file {dup} is listed more than once")
    for name, data, spec in (("jobs.json", jobs, JOB_KEYS), ("evals.json", evals, EVAL_KEYS)):
        if data is None:
            continue
        if not isinstance(data, list):
            problems.append(f"{name}: expected a list of objects, got {type(data).__name__}")
            continue
        for i, obj in enumerate(data):
            _keys(obj, spec, f"{name}[{i}]", problems)
        ids = [o.get("id") for o in data if isinstance(o, dict)]
        for dup in sorted({i for i in ids if i is not None and ids.count(i) > 1}):
            problems.append(f"{name}: {dup} is listed more than once")
    if problems:
        raise ExportProblems(problems)
    return Export(folder=folder, files=files, jobs=jobs, evals=evals)


def _check_file(folder: Path, f: dict, where: str, problems: list[str]) -> None:
    from tunehouse.api.files.protocol import UPLOAD_PURPOSES

    path = folder / "files" / f"{f['id']}.jsonl"
    if not path.is_file():
        problems.append(f"{where}: files/{f['id']}.jsonl is missing")
    elif isinstance(f.get("bytes"), int) and path.stat().st_size != f["bytes"]:
        problems.append(
            f"{where}: files/{f['id']}.jsonl has {path.stat().st_size:,} bytes, the manifest says "
            f"{f['bytes']:,} (truncated or changed?)"
        )
    if f.get("purpose") not in UPLOAD_PURPOSES:
        problems.append(f"{where}: purpose {f.get('purpose')!r} is not one of {', '.join(UPLOAD_PURPOSES)}")
    elif f["purpose"] == "fine-tune" and not str(f.get("filename", "")).lower().endswith(".jsonl"):
        problems.append(f"{where}: a fine-tune file's name must end in .jsonl (got {f.get('filename')!r})")


# --- planning ------------------------------------------------------------------------------------


def imported(session: Session, organization_id: str) -> dict[tuple[str, str], str]:
    """(kind, OpenAI id) → the id here, of everything imported before into this organization."""
    from tunehouse.store.tables import MigrationImport

    rows = session.execute(
        select(MigrationImport.kind, MigrationImport.source_id, MigrationImport.local_id).where(
            MigrationImport.organization_id == organization_id, MigrationImport.source == SOURCE
        )
    )
    return {(k, s): local for k, s, local in rows}


def _still_here(session: Session, kind: str, source_id: str, local_id: str, organization_id: str) -> bool:
    """Whether what an import record names still exists (deleted since: it is imported again)."""
    from tunehouse.store.tables import Eval, File, Job, ModelAlias

    table, column = {
        "file": (File, File.id),
        "eval": (Eval, Eval.id),
        "job": (Job, Job.id),
        "alias": (ModelAlias, ModelAlias.name),  # its record's local id is its target; the alias is the name
    }[kind]
    value = source_id if kind == "alias" else local_id
    return (
        session.scalar(select(column).where(column == value, table.organization_id == organization_id))
        is not None
    )


def _pydantic_problems(e: ValidationError, where: str) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{where}: {loc}: {msg}")
    return out


def job_body(job: dict, *, model: str, where: str, problems: list[str]) -> dict | None:
    """The create request for a job's replacement (file ids still OpenAI's), as the API takes it."""
    method = job.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("type"), str):
        problems.append(f"{where}: method must be an object with a 'type'")
        return None
    kind = method["type"]
    for k in method:
        if k not in ("type", kind) and method[k] is not None:
            problems.append(f"{where}: method.{k}: unknown field for a {kind!r} job")
    body: dict[str, Any] = {
        "model": model,
        "training_file": job["training_file"],
        "method": {"type": kind, kind: method.get(kind) or {}},
    }
    for k in ("validation_file", "suffix", "seed", "metadata"):
        if job.get(k) is not None:
            body[k] = job[k]
    return body


def _eval_body(ev: dict, where: str, problems: list[str]) -> dict | None:
    """OpenAI's eval object → the create request: a custom data source's `schema` (item and sample
    wrapped) back to `item_schema` and `include_sample_schema`; criteria without their ids."""
    config = ev["data_source_config"]
    if isinstance(config, dict) and "schema" in config and "item_schema" not in config:
        schema = config["schema"] if isinstance(config["schema"], dict) else {}
        props = schema.get("properties") or {}
        if config.get("type", "custom") == "custom":
            if "item" not in props:
                problems.append(f"{where}: data_source_config.schema has no 'item' property")
                return None
            config = {
                "type": "custom",
                "item_schema": props["item"],
                "include_sample_schema": "sample" in props,
            }
        else:
            config = {k: v for k, v in config.items() if k != "schema"}
    criteria = ev["testing_criteria"]
    if isinstance(criteria, list):
        criteria = [{k: v for k, v in c.items() if k != "id"} if isinstance(c, dict) else c for c in criteria]
    body = {"data_source_config": config, "testing_criteria": criteria}
    for k in ("name", "metadata"):
        if ev.get(k) is not None:
            body[k] = ev[k]
    return body


def _grader_models(spec: Any) -> list[str]:
    out: list[str] = []
    if isinstance(spec, list):
        for v in spec:
            out += _grader_models(v)
    elif isinstance(spec, dict):
        if spec.get("type") in ("score_model", "label_model") and isinstance(spec.get("model"), str):
            out.append(spec["model"])
        for v in spec.values():
            if isinstance(v, dict | list):
                out += _grader_models(v)
    return out


def make_plan(state, session: Session, *, principal, export: Export, base: str) -> Plan:
    """Every step, checked; raises ExportProblems (nothing created yet) when anything is wrong."""
    from tunehouse import ids
    from tunehouse.api.aliases.service import find_alias, resolve_grader_models, resolve_model_name
    from tunehouse.api.evals.protocol import CreateEvalRequest
    from tunehouse.api.fine_tuning.protocol import CreateFineTuningJobRequest
    from tunehouse.errors import APIError
    from tunehouse.evals.definitions import parse_data_source_config, parse_testing_criteria
    from tunehouse.store.catalog import is_base_model
    from tunehouse.store.tables import Checkpoint, Job
    from tunehouse.training.recipes import METHODS

    settings = state.settings
    org_id = principal.organization_id
    problems: list[str] = []
    warnings: list[str] = []
    steps: list[Step] = []
    done = {
        key: local
        for key, local in imported(session, org_id).items()
        if _still_here(session, *key, local, org_id)
    }

    def known_model(name: str) -> bool:
        try:
            name = resolve_model_name(settings, session, principal=principal, model=name)
        except APIError:
            return False
        return is_base_model(settings, name, session=session, organization_id=org_id) or (
            session.scalar(select(Checkpoint.id).where(Checkpoint.model_name == name)) is not None
        )

    if not is_base_model(settings, base, session=session, organization_id=org_id):
        problems.append(f"--base {base}: no such base model here (see /v1/models)")

    # Files: every file of the manifest.
    for f in export.files:
        local = done.get(("file", f["id"]))
        if local:
            steps.append(Step("file", f["id"], "exists", local, f["filename"]))
        else:
            steps.append(
                Step("file", f["id"], "create", ids.file_id(), f"{f['filename']} ({f['bytes']:,} bytes)")
            )
    file_ids = {s.source_id: s.local_id for s in steps}

    # Evals.
    for i, ev in enumerate(export.evals):
        where = f"evals.json[{i}] ({ev['id']})"
        local = done.get(("eval", ev["id"]))
        if local:
            steps.append(Step("eval", ev["id"], "exists", local, ev.get("name") or ""))
            continue
        body = _eval_body(ev, where, problems)
        if body is None:
            continue
        try:
            req = CreateEvalRequest.model_validate(body)
            config = parse_data_source_config(req.data_source_config)
            criteria = resolve_grader_models(
                settings, session, principal=principal, spec=req.testing_criteria, param="testing_criteria"
            )
            parse_testing_criteria(criteria, config)
        except ValidationError as e:
            problems += _pydantic_problems(e, where)
            continue
        except APIError as e:
            problems.append(f"{where}: {e.param + ': ' if e.param else ''}{e.message}")
            continue
        for m in sorted(set(_grader_models(criteria))):
            if not known_model(m):
                warnings.append(
                    f"eval {ev['id']}: a grader uses the model '{m}', which does not exist here; before "
                    f"running the eval, add an alias: tunehouse aliases add {m} MODEL"
                )
        steps.append(Step("eval", ev["id"], "create", ids.eval_id(), ev.get("name") or "", body=body))

    # Jobs, then the aliases of their old model names.
    base_info = None
    for i, job in enumerate(export.jobs):
        where = f"jobs.json[{i}] ({job['id']})"
        old_name = job.get("fine_tuned_model")
        local = done.get(("job", job["id"]))
        if local:
            status = session.scalar(select(Job.status).where(Job.id == local)) or "deleted"
            steps.append(Step("job", job["id"], "exists", local, f"{status}"))
        elif job["status"] != "succeeded" or not old_name:
            steps.append(
                Step("job", job["id"], "skip", None, f"{job['status']} at OpenAI: no model to replace")
            )
            continue
        else:
            model = base
            if str(job["model"]).startswith("ft:"):
                # It continued another fine-tuned model: it starts from that one's replacement
                # (through its alias), once the replacement has succeeded.
                if known_model(job["model"]):
                    model = job["model"]
                elif any(j.get("fine_tuned_model") == job["model"] for j in export.jobs):
                    steps.append(
                        Step(
                            "job",
                            job["id"],
                            "wait",
                            None,
                            f"continues {job['model']}, whose replacement has not succeeded yet: run "
                            "this command again once it has",
                        )
                    )
                    continue
                else:
                    problems.append(
                        f"{where}: it continues {job['model']}, which is neither in this export nor a "
                        "model or alias here"
                    )
                    continue
            body = job_body(job, model=model, where=where, problems=problems)
            if body is None:
                continue
            kind = body["method"]["type"]
            if kind not in METHODS:
                problems.append(f"{where}: method {kind!r} is not available here (only {', '.join(METHODS)})")
                continue
            for k in ("training_file", "validation_file"):
                fid = body.get(k)
                if fid is None:
                    continue
                meta = export.file(fid)
                if meta is None:
                    problems.append(f"{where}: {k} {fid} is not in manifest.json files")
                elif meta["purpose"] != "fine-tune":
                    problems.append(f"{where}: {k} {fid} has purpose {meta['purpose']!r}, not 'fine-tune'")
            try:
                req = CreateFineTuningJobRequest.model_validate(body)
            except ValidationError as e:
                problems += _pydantic_problems(e, where)
                continue
            if job.get("integrations"):
                warnings.append(
                    f"job {job['id']}: its integrations (e.g. wandb) are not carried over: tunehouse "
                    "sends no job data to third parties"
                )
            grader = (body["method"].get("reinforcement") or {}).get("grader")
            if grader is not None:
                try:
                    grader = resolve_grader_models(
                        settings,
                        session,
                        principal=principal,
                        spec=grader,
                        param="method.reinforcement.grader",
                    )
                except APIError as e:
                    problems.append(f"{where}: {e.message}")
                    continue
                for m in sorted(set(_grader_models(grader))):
                    if not known_model(m):
                        problems.append(
                            f"{where}: its grader uses the model '{m}', which does not exist here; add an "
                            f"alias first: tunehouse aliases add {m} MODEL"
                        )
            if any(
                export.file(body.get(k) or "") is None
                for k in ("training_file", "validation_file")
                if body.get(k)
            ):
                continue
            if base_info is None and not problems:
                base_info = _base_info(settings, session, base, org_id)
            estimate = None
            if base_info is not None:
                estimate = _check_data(settings, base_info, export, req, where, problems)
            note = f"{kind}, on {model}" + (f", suffix {req.suffix}" if req.suffix else "")
            steps.append(Step("job", job["id"], "create", ids.job_id(), note, body=body, estimate=estimate))
        # The alias of the old name → the replacement job (its model once it has succeeded).
        job_step = steps[-1]
        if job_step.action not in ("create", "exists") or not old_name:
            continue
        alias_local = done.get(("alias", old_name))
        existing = find_alias(session, org_id, old_name)
        if alias_local or (existing is not None and existing.target == job_step.local_id):
            steps.append(Step("alias", old_name, "exists", job_step.local_id, f"→ {job_step.local_id}"))
        elif existing is not None:
            problems.append(
                f"{where}: an alias {old_name} already exists here (→ {existing.target}); remove it "
                "(tunehouse aliases remove) to let the migration point it at the replacement"
            )
        elif known_model(old_name):
            problems.append(f"{where}: {old_name} is the name of a model here; it cannot become an alias")
        else:
            steps.append(
                Step("alias", old_name, "create", job_step.local_id, f"→ the replacement of {job['id']}")
            )

    for s in steps:  # the new jobs read the files as they are (or will be) here
        if s.kind == "job" and s.action == "create":
            for k in ("training_file", "validation_file"):
                if s.body.get(k):
                    s.body[k] = file_ids.get(s.body[k], s.body[k])
    _check_quotas(settings, session, org_id, export, steps, problems)
    if problems:
        raise ExportProblems(problems)
    return Plan(base=base, steps=steps, warnings=warnings)


@dataclass
class _Base:
    name: str
    tokenizer: Any
    context_length: int
    price: float
    tokens_per_second: float | None


def _base_info(settings, session: Session, base: str, org_id: str) -> _Base:
    from transformers import AutoTokenizer

    from tunehouse.data.analysis import context_length_for
    from tunehouse.store.catalog import resolve_base_model
    from tunehouse.training import throughput
    from tunehouse.usage.prices import price_for

    entry = resolve_base_model(settings, base, session=session, organization_id=org_id)
    return _Base(
        name=base,
        tokenizer=AutoTokenizer.from_pretrained(entry.path),
        context_length=context_length_for(entry.path),
        price=price_for(settings, base).training,
        # What jobs on this base measured here, else a short probe (once per home, unless
        # TUNEHOUSE_THROUGHPUT_PROBE turns it off): a time estimate on a fresh install too.
        tokens_per_second=(
            throughput.ensure_measured(settings.home, base, entry.path, dtype=settings.dtype)
            if settings.throughput_probe
            else throughput.tokens_per_second(settings.home, base)
        ),
    )


def _check_data(settings, base: _Base, export: Export, req, where: str, problems: list[str]) -> dict | None:
    """The job's files through the same data check its validation runs: any error is a problem
    now (not a failed job later), and the estimate (tokens, cost, seconds) for the plan."""
    from tunehouse.data.analysis import check_files

    kind = req.method.type
    hyper = getattr(req.method, kind).hyperparameters if getattr(req.method, kind, None) else None
    report = check_files(
        export.path(req.training_file),
        validation=export.path(req.validation_file) if req.validation_file else None,
        tokenizer=base.tokenizer,
        context_length=base.context_length,
        method=kind,
        n_epochs=hyper.n_epochs if hyper is not None else "auto",
        price_per_million=base.price,
        tokens_per_second=base.tokens_per_second,
    )
    if not report.ok:
        code, message = report.job_error()
        problems.append(f"{where}: its data does not pass the checks on {base.name} ({code}): {message}")
        return None
    return report.estimate


def _check_quotas(
    settings, session: Session, org_id: str, export: Export, steps: list[Step], problems
) -> None:
    from tunehouse.errors import APIError
    from tunehouse.usage.quotas import check_storage, check_training_tokens, concurrent_jobs, effective_quotas

    quotas = effective_quotas(settings, session, org_id)
    new_jobs = [s for s in steps if s.kind == "job" and s.action == "create"]
    size = sum(export.file(s.source_id)["bytes"] for s in steps if s.kind == "file" and s.action == "create")
    try:
        check_storage(settings, session, org_id, size)
    except APIError as e:
        problems.append(f"the files need {size:,} bytes: {e.message}")
    if quotas.max_concurrent_jobs is not None and new_jobs:
        n = concurrent_jobs(session, org_id)
        if n + len(new_jobs) > quotas.max_concurrent_jobs:
            problems.append(
                f"{len(new_jobs)} new job(s) and {n} running would exceed max_concurrent_jobs "
                f"({quotas.max_concurrent_jobs}): raise it (tunehouse quotas set) or wait for jobs to finish"
            )
    tokens = sum(int((s.estimate or {}).get("billable_tokens") or 0) for s in new_jobs)
    try:
        check_training_tokens(quotas, session, org_id, tokens)
    except APIError as e:
        problems.append(f"the new jobs need about {tokens:,} training tokens: {e.message}")


# --- applying ------------------------------------------------------------------------------------


def apply_plan(
    state, session: Session, *, principal, export: Export, plan: Plan, progress=None
) -> dict[str, int]:
    """Create what the plan says, each object with its import record in the same commit."""
    from tunehouse.api.aliases.service import create_alias
    from tunehouse.api.evals.protocol import CreateEvalRequest
    from tunehouse.api.evals.service import create_eval
    from tunehouse.api.fine_tuning.protocol import CreateFineTuningJobRequest
    from tunehouse.api.fine_tuning.service import create_job
    from tunehouse.store import files
    from tunehouse.store.tables import MigrationImport

    counts = {"file": 0, "eval": 0, "job": 0, "alias": 0}

    def record(step: Step) -> None:
        # A record of an object deleted since (the plan imports it again) makes way for the new one.
        session.execute(
            delete(MigrationImport).where(
                MigrationImport.organization_id == principal.organization_id,
                MigrationImport.source == SOURCE,
                MigrationImport.kind == step.kind,
                MigrationImport.source_id == step.source_id,
            )
        )
        session.add(
            MigrationImport(
                organization_id=principal.organization_id,
                source=SOURCE,
                kind=step.kind,
                source_id=step.source_id,
                local_id=step.local_id,
            )
        )

    order = {"file": 0, "eval": 1, "job": 2, "alias": 3}
    for step in sorted(plan.creates, key=lambda s: order[s.kind]):
        try:
            if step.kind == "file":
                meta = export.file(step.source_id)
                key = files.blob_key(principal.organization_id, step.local_id)
                state.files.write_bytes(key, export.path(step.source_id).read_bytes())
                files.add_file(
                    session,
                    file_id=step.local_id,
                    key=key,
                    organization_id=principal.organization_id,
                    project_id=principal.owning_project_id,
                    filename=meta["filename"],
                    purpose=meta["purpose"],
                    size=meta["bytes"],
                )
                record(step)
                session.commit()
            elif step.kind == "eval":
                record(step)
                create_eval(
                    session,
                    principal=principal,
                    req=CreateEvalRequest.model_validate(step.body),
                    settings=state.settings,
                    eval_id=step.local_id,
                )
            elif step.kind == "job":
                record(step)
                create_job(
                    state.settings,
                    session,
                    files_store=state.files,
                    principal=principal,
                    req=CreateFineTuningJobRequest.model_validate(step.body),
                    job_id=step.local_id,
                )
            else:
                record(step)
                create_alias(
                    state.settings,
                    session,
                    principal=principal,
                    name=step.source_id,
                    target=step.local_id,
                    cli=True,
                )
        except BaseException:
            session.rollback()
            if step.kind == "file":
                files.delete_bytes(state.files, files.blob_key(principal.organization_id, step.local_id))
            raise
        counts[step.kind] += 1
        if progress is not None:
            progress(step)
    return counts


def count_imports(session: Session, organization_id: str) -> int:
    from tunehouse.store.tables import MigrationImport

    return session.scalar(
        select(func.count())
        .select_from(MigrationImport)
        .where(MigrationImport.organization_id == organization_id)
    )
