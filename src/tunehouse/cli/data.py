"""`tunehouse data check`: validate training files locally, before uploading or paying for anything.

Exit status: 0 = no errors (warnings allowed), 1 = errors found, 2 = bad usage or unreadable file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunehouse.data.validation import Problem, ValidationReport

data_app = typer.Typer(
    help="Check training data: format, token counts, duplicates, cost.", no_args_is_help=True
)

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
MAX_LINES_SHOWN = 20  # line numbers listed per problem kind


@data_app.callback()
def _data() -> None:
    """Check training data: format, token counts, duplicates, cost."""


def _fail(message: str) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(EXIT_USAGE)


def _load_tokenizer(model: str | None):
    """(model name, folder, tokenizer) for a catalog name or a local Hugging Face folder."""
    from tunehouse.config import Settings
    from tunehouse.errors import APIError
    from tunehouse.store.catalog import resolve_base_model

    if model is not None and Path(model).is_dir():
        folder = Path(model)
    else:
        settings = Settings()
        name = model or settings.default_model
        try:
            folder = resolve_base_model(settings, name).path
        except APIError as e:
            raise _fail(f"{e.message} Pass a base model name or a local model folder with --model.") from e
        except Exception as e:  # e.g. the embedded model is not installed
            raise _fail(str(e)) from e
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise _fail(f"cannot load the tokenizer from {folder}: {e}") from e
    return model or folder.name, folder, tokenizer


def _problem_table(title: str, problems: list[Problem], counts: dict[str, int], style: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    table.add_column("kind", style=style, no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("lines")
    table.add_column("example")
    by_code: dict[str, list[Problem]] = {}
    for p in problems:
        by_code.setdefault(p.code, []).append(p)
    for code, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        shown = by_code.get(code, [])
        lines = sorted({p.line for p in shown if p.line is not None})
        text = ", ".join(map(str, lines[:MAX_LINES_SHOWN]))
        if len(lines) > MAX_LINES_SHOWN or n > len(shown):
            text += ", …"
        sample = shown[0] if shown else None
        example = ""
        if sample is not None:
            example = (f"[{sample.field}] " if sample.field else "") + sample.message
        table.add_row(code, f"{n:,}", text or "-", escape(example))
    return table


def _print_report(console: Console, label: str, path: Path, report: ValidationReport) -> None:
    status = "[green]ok[/]" if not report.error_counts else "[red]errors[/]"
    console.print(
        f"\n[bold]{label}[/] {escape(str(path))}  ·  format: {report.format or 'unknown'}  ·  "
        f"{report.n_examples:,} examples  ·  {report.n_errors:,} errors, {report.n_warnings:,} warnings  ·  {status}"
    )
    if report.error_counts:
        console.print(_problem_table("Errors", report.errors, report.error_counts, "red"))
    if report.warning_counts:
        console.print(_problem_table("Warnings", report.warnings, report.warning_counts, "yellow"))
    stats = report.stats
    if stats and stats.get("tokens_per_example"):
        table = Table(title="Per example", title_justify="left")
        for col in ("", "min", "median", "p90", "max", "total"):
            table.add_column(col, justify="right" if col else "left")
        for key, name in (
            ("tokens_per_example", "tokens"),
            ("trained_tokens_per_example", "trained tokens"),
            ("messages_per_example", "messages"),
        ):
            d = stats[key]
            table.add_row(name, *(f"{d[k]:,.0f}" for k in ("min", "median", "p90", "max", "total")))
        console.print(table)
        console.print(
            f"truncated to {stats['context_length']:,} tokens: {stats['n_truncated']:,}  ·  "
            f"without a system message: {stats['n_missing_system']:,}  ·  "
            f"duplicates: {stats['n_duplicates']:,} exact, {stats['n_near_duplicates']:,} near"
            + (
                f"  ·  also in the training file: {stats['n_overlapping_training']:,}"
                if "n_overlapping_training" in stats
                else ""
            )
        )


def _print_estimate(console: Console, model: str, estimate: dict) -> None:
    epochs = f"{estimate['n_epochs']}" + (" (auto)" if estimate["n_epochs_auto"] else "")
    lines = [
        f"base model: {escape(model)}, context length {estimate['context_length']:,}",
        f"epochs: {epochs}",
        f"billable tokens: {estimate['tokens_per_epoch']:,} per epoch × {estimate['n_epochs']} = "
        f"{estimate['billable_tokens']:,}",
        f"cost at ${estimate['price_per_million_tokens']:g}/M tokens: ${estimate['cost_usd']:,.2f}",
    ]
    if estimate.get("estimated_seconds") is not None:
        secs = estimate["estimated_seconds"]
        took = (
            f"{secs:,.0f} s"
            if secs < 120
            else f"{secs / 60:,.1f} min"
            if secs < 7200
            else f"{secs / 3600:,.1f} h"
        )
        lines.append(f"training time at {estimate['tokens_per_second']:,.0f} tokens/s: about {took}")
    console.print("\n[bold]Estimate[/]\n  " + "\n  ".join(lines))


@data_app.command("check")
def check(
    train: Annotated[Path, typer.Argument(help="Training file (JSONL).", show_default=False)],
    validation: Annotated[
        Path | None, typer.Option("--validation", "-v", help="Validation file (JSONL).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Base model name or local model folder (default: the embedded model)."
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="supervised (chat format) or dpo (preference format).")
    ] = "supervised",
    epochs: Annotated[
        str, typer.Option("--epochs", help="Epochs for the estimate: a number or auto.")
    ] = "auto",
    context_length: Annotated[
        int | None,
        typer.Option(help="Training context in tokens (default: the model's own)."),
    ] = None,
    price: Annotated[float, typer.Option(help="Price per million billable tokens, USD.")] = 25.0,
    tokens_per_second: Annotated[
        float | None,
        typer.Option(
            help="Training speed for the time estimate (default: what jobs measured on this machine)."
        ),
    ] = None,
    min_examples: Annotated[int, typer.Option(help="Fewest training examples allowed.")] = 10,
    format_only: Annotated[
        bool, typer.Option("--format-only", help="Skip token counts (no tokenizer is loaded).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a training file (and a validation file) without a server: every problem with its line
    number, token statistics with the base model's tokenizer, duplicates, overlap and the cost."""
    from tunehouse.data.analysis import analyze, context_length_for
    from tunehouse.data.validation import METHODS, validate_file

    if method not in METHODS:
        raise _fail(f"--method must be one of {', '.join(METHODS)}")
    if epochs != "auto" and (not epochs.isdigit() or not 1 <= int(epochs) <= 50):
        raise _fail("--epochs must be auto or a whole number from 1 to 50")
    for p in (train, validation):
        if p is not None and not p.is_file():
            raise _fail(f"cannot read {p}: no such file")

    console = Console(stderr=as_json)
    try:
        report = validate_file(train, method=method, min_examples=min_examples)
        if validation is not None:
            report.validation = validate_file(
                validation, method=method, min_examples=1, file_kind="validation"
            )
    except OSError as e:
        raise _fail(f"cannot read the file: {e}") from e

    model_name = None
    tokenizer = None
    ctx = context_length
    if not format_only:
        model_name, folder, tokenizer = _load_tokenizer(model)
        ctx = ctx or context_length_for(folder)
        if tokens_per_second is None:
            # What earlier jobs measured on this machine (the server's home), when there were any.
            from tunehouse.config import Settings
            from tunehouse.training import throughput

            tokens_per_second = throughput.tokens_per_second(Settings().home, str(model_name))
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=as_json) as bar:
        task = bar.add_task("counting tokens", total=report.n_examples)
        analyze(
            report,
            train,
            tokenizer=tokenizer,
            context_length=ctx or 2048,
            n_epochs=epochs,
            validation_path=validation,
            price_per_million=price,
            tokens_per_second=tokens_per_second,
            method=method,
            progress=lambda n: bar.update(task, completed=n),
        )

    if as_json:
        out = report.to_dict()
        out["model"] = model_name
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        _print_report(console, "training file", train, report)
        if report.validation is not None and validation is not None:
            _print_report(console, "validation file", validation, report.validation)
        if report.estimate:
            _print_estimate(console, model_name or "", report.estimate)
        error = report.job_error()
        if error is None:
            console.print("\n[bold green]No errors.[/] The file is ready to upload.")
        else:
            console.print(
                f"\n[bold red]{report.n_errors + (report.validation.n_errors if report.validation else 0):,} errors.[/] Fix them and run the check again."
            )
    raise typer.Exit(EXIT_OK if report.ok else EXIT_ERRORS)
