"""`tunehouse eval`: run one eval against several models on a tunehouse server and print the
results side by side.

The eval file is the JSON a team already has from OpenAI's Evals API: `{"eval": <the body of
POST /v1/evals>, "run": <the body of POST /v1/evals/{id}/runs>}`. The run's data source is used
once per `--model` (its `model` set to each), and `--items` replaces its source with a local JSONL
file of items. It talks to the server with the official `openai` SDK, like any client would.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def eval_cmd(
    eval_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help='JSON: {"eval": ..., "run": ...}.')
    ],
    model: Annotated[list[str], typer.Option("--model", "-m", help="A model to run (repeatable).")],
    items: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="JSONL of items, one object per line.")
    ] = None,
    base_url: Annotated[str, typer.Option(envvar="OPENAI_BASE_URL", help="The server's /v1 URL.")] = (
        "http://127.0.0.1:8000/v1"
    ),
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="An API key of the project.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the runs.")] = 3600.0,
) -> None:
    """Run an eval against one or more models and print a side-by-side table."""
    from openai import OpenAI

    spec = json.loads(eval_file.read_text())
    if not isinstance(spec, dict) or "eval" not in spec or "run" not in spec:
        raise typer.BadParameter('the eval file holds {"eval": {...}, "run": {...}}', param_hint="EVAL_FILE")
    client = OpenAI(base_url=base_url, api_key=api_key or "none")
    ev = client.evals.create(**spec["eval"])
    runs = []
    for name in model:
        body = copy.deepcopy(spec["run"])
        source = body.setdefault("data_source", {})
        if source.get("type") == "completions":
            source["model"] = name
        if items is not None:
            lines = [json.loads(line) for line in items.read_text().splitlines() if line.strip()]
            content = [line if "item" in line else {"item": line} for line in lines]
            source["source"] = {"type": "file_content", "content": content}
        body.setdefault("name", name)
        runs.append(client.evals.runs.create(ev.id, **body))
    console.print(f"eval {ev.id}: {len(runs)} run(s) started")
    deadline = time.monotonic() + timeout
    done: dict[str, object] = {}
    while len(done) < len(runs) and time.monotonic() < deadline:
        for run in runs:
            if run.id not in done:
                now = client.evals.runs.retrieve(run.id, eval_id=ev.id)
                if now.status in ("completed", "failed", "canceled"):
                    done[run.id] = now
        time.sleep(1.0)
    final = [done.get(run.id) or client.evals.runs.retrieve(run.id, eval_id=ev.id) for run in runs]
    names = [c.get("name", "") for c in spec["eval"].get("testing_criteria", [])]
    console.print(side_by_side(model, final, names=criterion_names(final, names)))
    if any(run.status != "completed" for run in final):
        raise typer.Exit(1)


def criterion_names(runs: list, names: list[str]) -> dict[str, str]:
    """A run reports each criterion as "<name>-<id>"; the table shows its name."""
    out = {}
    for run in runs:
        for r in run.per_testing_criteria_results or []:
            name = next((n for n in names if r.testing_criteria.startswith(f"{n}-")), None)
            out[r.testing_criteria] = name or r.testing_criteria
    return out


def side_by_side(models: list[str], runs: list, *, names: dict[str, str] | None = None) -> Table:
    table = Table(title="pass rate by testing criterion")
    table.add_column("criterion")
    for name, run in zip(models, runs, strict=True):
        table.add_column(f"{name}\n({run.status})", justify="right")
    criteria: list[str] = []
    for run in runs:
        for r in run.per_testing_criteria_results or []:
            if r.testing_criteria not in criteria:
                criteria.append(r.testing_criteria)
    for criterion in criteria:
        cells = []
        for run in runs:
            r = next(
                (r for r in run.per_testing_criteria_results or [] if r.testing_criteria == criterion), None
            )
            cells.append(
                f"{r.passed / (r.passed + r.failed):.0%} ({r.passed}/{r.passed + r.failed})"
                if r and r.passed + r.failed
                else "-"
            )
        table.add_row((names or {}).get(criterion, criterion), *cells)
    counts = [run.result_counts for run in runs]
    table.add_row(
        "all criteria",
        *[f"{c.passed / c.total:.0%} ({c.passed}/{c.total})" if c.total else "-" for c in counts],
    )
    table.add_row("errored items", *[str(c.errored) for c in counts])
    tokens = [sum(u.total_tokens for u in run.per_model_usage or []) for run in runs]
    table.add_row("tokens", *[str(t) for t in tokens])
    return table
