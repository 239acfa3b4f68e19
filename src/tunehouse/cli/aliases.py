"""`tunehouse aliases add|list|remove`: an organization's model aliases, on the home database
directly (like `tunehouse keys`; the audit log records them as `cli`). The same rules as the admin
API (/v1/organization/model_aliases): api/aliases/service.py."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunehouse.cli.tenancy import HomeOpt, JsonOpt, OrgOpt, _fail, _org, _state, _when

aliases_app = typer.Typer(
    no_args_is_help=True,
    help="Model aliases: another name (say an old ft:gpt-… name) that reaches a model or a job's model.",
)
console = Console(soft_wrap=True)


def org_principal(session, org):
    """The organization's admin, as the command line acts (no key)."""
    from tunehouse.tenancy.auth import Principal
    from tunehouse.tenancy.projects import default_project

    return Principal(
        organization_id=org.id,
        organization_slug=org.slug,
        key_id=None,
        default_project_id=default_project(session, org.id).id,
    )


@aliases_app.command("add")
def aliases_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The alias, e.g. an old ft:gpt-… model name.")],
    target: Annotated[
        str, typer.Argument(metavar="TARGET", help="A model name, or a fine-tuning job id (ftjob-…).")
    ],
    org: OrgOpt = "default",
    home: HomeOpt = None,
) -> None:
    """Add an alias: requests naming NAME reach TARGET (a job's fine-tuned model once it has succeeded)."""
    from tunehouse.api.aliases.protocol import CreateAliasRequest
    from tunehouse.api.aliases.service import create_alias
    from tunehouse.errors import APIError

    try:
        CreateAliasRequest(name=name, target=target)
    except ValueError:
        raise _fail("An alias is 1 to 256 characters without spaces; a target 1 to 512.") from None
    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        try:
            out = create_alias(
                state.settings,
                s,
                principal=org_principal(s, organization),
                name=name,
                target=target,
                cli=True,
            )
        except APIError as e:
            raise _fail(escape(e.message)) from None
    now = f" (now {out.resolved_model})" if out.resolved_model and out.resolved_model != target else ""
    console.print(f"{escape(name)} → {escape(target)}{escape(now)} [{out.status}]", highlight=False)


@aliases_app.command("list")
def aliases_list(org: OrgOpt = "default", home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The organization's aliases, where each leads now (ready, pending: its job has not succeeded
    yet, missing: its target was deleted)."""
    from tunehouse.api.aliases.service import list_aliases

    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        rows = list_aliases(state.settings, s, principal=org_principal(s, organization)).data
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    table = Table("alias", "target", "model now", "status", "created")
    for r in rows:
        table.add_row(r.name, r.target, r.resolved_model or "-", r.status, _when(r.created_at))
    console.print(table if rows else f"No model aliases in '{escape(org)}'.")


@aliases_app.command("remove")
def aliases_remove(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The alias.")],
    org: OrgOpt = "default",
    home: HomeOpt = None,
) -> None:
    """Remove an alias (the model it led to stays)."""
    from tunehouse.api.aliases.service import delete_alias
    from tunehouse.errors import APIError

    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        try:
            delete_alias(s, principal=org_principal(s, organization), name=name, cli=True)
        except APIError as e:
            raise _fail(escape(e.message)) from None
    console.print(f"Removed the alias {escape(name)}.", highlight=False)
