"""`tunehouse migrate openai EXPORT_DIR [--base MODEL] [--org ORG] [--dry-run]`: move OpenAI
fine-tuning work (what scripts/export_from_openai.py exported) into an organization here: files,
jobs re-created on an open base, evals, and aliases from the old `ft:gpt-…` names. Works on the
home database directly, like `tunehouse keys` (run it on the server's machine, or with --home on
its home); the server's workers pick the new jobs up. The reading, checks and plan are
cli/openai_import.py.

Exit status: 0 = imported (or planned, with --dry-run), 1 = the export has problems (every one is
listed; nothing was imported), 2 = bad usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tunehouse.cli.tenancy import HomeOpt, OrgOpt, _org, _state

migrate_app = typer.Typer(no_args_is_help=True, help="Move fine-tuning work here from another platform.")

ACTIONS = {
    "create": "create",
    "exists": "already imported",
    "skip": "skip",
    "wait": "later",
}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_plan(console: Console, plan, *, dry_run: bool) -> None:
    # One line per step (a table would cut the long ft: names on a narrow terminal).
    console.print(f"Plan (base model: {escape(plan.base)}):", highlight=False)
    for s in plan.steps:
        here = "(new)" if s.action == "create" and dry_run else s.local_id
        e = s.estimate or {}
        cost = ""
        if e.get("billable_tokens") is not None:
            seconds = e.get("estimated_seconds")
            cost = (
                f"; {e['billable_tokens']:,} tokens, ${e['cost_usd']:,.4f}, "
                f"{_duration(seconds) if seconds else 'time ?'}"
            )
        target = f" → {here}" if here and s.kind != "alias" else ""
        if s.kind == "alias" and s.action == "create" and not dry_run:
            cost = f" ({s.local_id})"
        console.print(
            f"  {s.kind:<5} {ACTIONS[s.action]:<16} {escape(s.source_id)}{escape(target)}: {escape(s.note)}{cost}",
            highlight=False,
        )
    new_jobs = [s for s in plan.steps if s.kind == "job" and s.action == "create"]
    tokens = sum(int((s.estimate or {}).get("billable_tokens") or 0) for s in new_jobs)
    cost = sum(float((s.estimate or {}).get("cost_usd") or 0) for s in new_jobs)
    seconds = [(s.estimate or {}).get("estimated_seconds") for s in new_jobs]
    counts = {k: sum(1 for s in plan.creates if s.kind == k) for k in ("file", "eval", "job", "alias")}
    console.print(
        f"To create: {counts['file']} file(s), {counts['eval']} eval(s), {counts['job']} job(s), "
        f"{counts['alias']} alias(es)."
    )
    if new_jobs:
        if all(seconds):
            when = f"about {_duration(sum(seconds))} of training, one job after another on one worker"
        else:
            when = "time unknown: this machine's training speed on the base could not be measured"
        console.print(f"Estimated: {tokens:,} billable training tokens, ${cost:,.4f}; {when}.")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


@migrate_app.command("openai")
def migrate_openai(
    export_dir: Annotated[
        Path,
        typer.Argument(metavar="EXPORT_DIR", help="The folder scripts/export_from_openai.py wrote."),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="The open base model the jobs are re-created on (default: the server's default)."
        ),
    ] = None,
    org: OrgOpt = "default",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan with its estimated cost and time; change nothing."),
    ] = False,
    home: HomeOpt = None,
) -> None:
    """Import an OpenAI export: files, fine-tuning jobs (re-created on --base), evals, and aliases
    from each old ft: model name to its replacement. Running it again creates nothing twice."""
    import logging

    from tunehouse.cli.aliases import org_principal
    from tunehouse.cli.openai_import import ExportProblems, apply_plan, make_plan, read_export

    logging.basicConfig(level=logging.WARNING)
    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)

    def fail(problems: list[str]) -> typer.Exit:
        err.print(f"[bold red]The export in {escape(str(export_dir))} has {len(problems)} problem(s):[/]")
        for p in problems:
            err.print(f"  - {escape(p)}", highlight=False)
        err.print("Nothing was imported.")
        return typer.Exit(1)

    try:
        export = read_export(export_dir)
    except ExportProblems as e:
        raise fail(e.problems) from None
    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        principal = org_principal(s, organization)
        try:
            plan = make_plan(
                state, s, principal=principal, export=export, base=base or state.settings.default_model
            )
        except ExportProblems as e:
            raise fail(e.problems) from None
        _print_plan(console, plan, dry_run=dry_run)
        if dry_run:
            console.print("Dry run: nothing was changed.")
            return
        if not plan.creates:
            console.print("Nothing to do: everything in this export is imported already.")
            return

        def progress(step) -> None:
            console.print(
                f"  created {step.kind} {escape(step.local_id)} ← {escape(step.source_id)}", highlight=False
            )

        counts = apply_plan(state, s, principal=principal, export=export, plan=plan, progress=progress)
    console.print(
        f"Imported {counts['file']} file(s), {counts['eval']} eval(s), {counts['job']} job(s), "
        f"{counts['alias']} alias(es) into '{escape(organization.name)}'. Each old ft: name answers once its "
        "job has succeeded (tunehouse aliases list)."
    )
