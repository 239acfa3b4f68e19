"""`tunehouse models add|list|remove`: your own base models, registered in the local home's database
(whoever runs these has the database itself, so no key is needed). The same as the admin API's
/v1/organization/base_models; both go through tunehouse.store.registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tunehouse.cli.tenancy import HomeOpt, JsonOpt, _fail, _org, _state

models_app = typer.Typer(no_args_is_help=True, help="Base models: add your own, list, remove.")
console = Console()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _show(d: dict) -> None:
    orgs = ", ".join(d["organizations"]) if d["organizations"] else "all organizations"
    mem = d["memory_bytes"]
    console.print(
        f"[bold]{d['name']}[/] ({d['id']}): {d['architecture']} ({d['model_type']}), "
        f"{d['parameters'] / 1e6:.1f}M parameters, {d['dtype']} weights, context {d['context_length']} tokens\n"
        f"  memory (estimated): serve {_gib(mem['serve'])}, train LoRA {_gib(mem['train_lora'])}, "
        f"train full {_gib(mem['train_full'])}\n"
        f"  usable by: {orgs}\n  stored at: {d['path']}",
        highlight=False,
    )


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model folder or a .gguf file.")],
    name: Annotated[
        str | None,
        typer.Option(help="The name clients use as `model` (default: the folder's or file's name)."),
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            "--chat-template",
            help="A Jinja chat template file, for a model without one (or to replace its own).",
        ),
    ] = None,
    org: Annotated[
        list[str] | None,
        typer.Option(
            "--org", help="An organization (name or id) that may use it; repeat for several. Default: all."
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a model, copy it under the server's home and register it as a base model."""
    from tunehouse.errors import APIError
    from tunehouse.store.registry import add_model, describe

    template = None
    if chat_template is not None:
        try:
            template = chat_template.read_text()
        except OSError as e:
            raise _fail(f"Cannot read the chat template {chat_template}: {e}") from None
    with _state(home) as state, state.db.session() as s:
        org_ids = [_org(s, o).id for o in org] if org else None
        try:
            with console.status(f"Checking and copying {path} ..."):
                row = add_model(
                    s, state.settings, source=path, name=name, chat_template=template, organizations=org_ids
                )
        except APIError as e:
            raise _fail(e.message) from None
        d = describe(row)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    console.print("Added:")
    _show(d)


@models_app.command("list")
def models_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Base models: the default, those of TUNEHOUSE_BASE_MODELS, and the registered ones."""
    from tunehouse.store.registry import describe, list_models

    with _state(home) as state, state.db.session() as s:
        rows = [describe(r) for r in list_models(s)]
        settings = state.settings
        fixed = [settings.default_model, *[n for n in settings.base_models if n != settings.default_model]]
    if as_json:
        typer.echo(json.dumps({"settings": fixed, "registered": rows}, indent=2))
        return
    table = Table(
        "name", "architecture", "parameters", "context", "serve", "train LoRA", "train full", "usable by"
    )
    for n in fixed:
        table.add_row(n, "-", "-", "-", "-", "-", "-", "all (settings)")
    for r in rows:
        mem = r["memory_bytes"]
        table.add_row(
            r["name"], r["architecture"], f"{r['parameters'] / 1e6:.1f}M", str(r["context_length"]),
            _gib(mem["serve"]), _gib(mem["train_lora"]), _gib(mem["train_full"]),
            ", ".join(r["organizations"]) if r["organizations"] else "all",
        )  # fmt: skip
    console.print(table)


@models_app.command("remove")
def models_remove(
    name: Annotated[str, typer.Argument(help="The registered model's name (or bm_ id).")],
    home: HomeOpt = None,
) -> None:
    """Unregister a base model and delete its copied weights (refused while fine-tuned models or
    unfinished jobs are built on it)."""
    from tunehouse.errors import APIError
    from tunehouse.store.registry import remove_model

    with _state(home) as state, state.db.session() as s:
        try:
            row = remove_model(s, state.settings, name)
        except APIError as e:
            raise _fail(e.message) from None
    console.print(f"Removed base model {row.name} ({row.id}).")
