"""`tunehouse keys|orgs|projects|audit`: tenancy administration on the local home database (whoever
runs them has the database itself, so no key is needed; the audit log records them as `cli`)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, revoke, rotate.")
orgs_app = typer.Typer(no_args_is_help=True, help="Organizations: create, list, delete.")
projects_app = typer.Typer(
    no_args_is_help=True, help="Projects of an organization: create, list, archive, delete."
)
console = Console()

HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="State folder (default: TUNEHOUSE_HOME or a per-user data dir).")
]
OrgOpt = Annotated[str, typer.Option("--org", help="Organization name or id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _state(home: Path | None):
    from tunehouse.api.state import AppState
    from tunehouse.config import Settings

    state = AppState.open(Settings(home=home) if home is not None else Settings())
    try:
        yield state
    finally:
        state.close()


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/]")
    return typer.Exit(1)


def _org(session, name_or_id: str):
    from tunehouse.tenancy.projects import find_org

    org = find_org(session, name_or_id)
    if org is None:
        raise _fail(f"No organization named '{name_or_id}'.")
    return org


def _project(session, org, name_or_id: str):
    from tunehouse.errors import NotFound
    from tunehouse.tenancy.projects import get_project

    try:
        return get_project(session, organization_id=org.id, project_id=name_or_id)
    except NotFound:
        raise _fail(f"No project '{name_or_id}' in organization '{org.name}'.") from None


def _when(t: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


# --- keys --------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Option("--org", help="Organization name (created if needed).")] = "default",
    project: Annotated[
        str | None, typer.Option(help="Project name or id; without it the key is an organization admin key.")
    ] = None,
    role: Annotated[str, typer.Option(help="owner, member or reader (project keys).")] = "owner",
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    home: HomeOpt = None,
) -> None:
    """Create an API key and print it (once: only its hash is stored)."""
    from tunehouse.errors import APIError
    from tunehouse.tenancy.auth import create_key
    from tunehouse.tenancy.projects import get_or_create_org

    with _state(home) as state, state.db.transaction() as s:
        organization = get_or_create_org(s, org)
        project_id = _project(s, organization, project).id if project else None
        try:
            _, key = create_key(
                s, organization_id=organization.id, project_id=project_id, role=role, name=name
            )
        except APIError as e:
            raise _fail(e.message) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list(org: OrgOpt = "default", home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Live keys of an organization (their prefix only: keys are never shown again)."""
    from sqlalchemy import select

    from tunehouse.store.tables import Project
    from tunehouse.tenancy.auth import list_keys, redacted

    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        names = {
            pid: pname
            for pid, pname in s.execute(
                select(Project.id, Project.name).where(Project.organization_id == organization.id)
            )
        }
        rows = [
            {
                "id": k.id,
                "redacted_value": redacted(k),
                "name": k.name,
                "project": names.get(k.project_id) if k.project_id else None,
                "project_id": k.project_id,
                "role": k.role,
                "created_at": k.created_at,
                "last_used_at": k.last_used_at,
            }
            for k in list_keys(s, organization_id=organization.id, project_id=None, all_projects=True)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "key", "name", "project", "role", "created", "last used")
    for r in rows:
        table.add_row(
            r["id"], r["redacted_value"], r["name"] or "-", r["project"] or "(admin key)", r["role"],
            _when(r["created_at"]), _when(r["last_used_at"]),
        )  # fmt: skip
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], home: HomeOpt = None
) -> None:
    """Revoke a key: it stops working at once."""
    from tunehouse.tenancy.auth import revoke_key

    with _state(home) as state, state.db.transaction() as s:
        if not revoke_key(s, key_id):
            raise _fail(f"No live key with id '{key_id}'.")
    console.print(f"Revoked {key_id}.")


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], home: HomeOpt = None
) -> None:
    """Replace a key by a new one with the same project and role; the old one is revoked at once."""
    from sqlalchemy import select

    from tunehouse.store.tables import ApiKey
    from tunehouse.tenancy.auth import rotate_key

    with _state(home) as state, state.db.transaction() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
        if row is None:
            raise _fail(f"No live key with id '{key_id}'.")
        new, key = rotate_key(s, row)
    # The message goes to stderr, so `KEY=$(tunehouse keys rotate ...)` captures only the key.
    Console(stderr=True).print(f"{key_id} is revoked; the new key is {new.id} (shown once, keep it):")
    typer.echo(key)


# --- organizations -----------------------------------------------------------------------------


@orgs_app.command("create")
def orgs_create(
    name: Annotated[str, typer.Argument(help="Organization name.")], home: HomeOpt = None
) -> None:
    """Create an organization (with its default project) and print its id."""
    from tunehouse.tenancy.projects import find_org, get_or_create_org

    with _state(home) as state, state.db.transaction() as s:
        if find_org(s, name) is not None:
            raise _fail(f"An organization named '{name}' already exists.")
        org = get_or_create_org(s, name)
    typer.echo(org.id)


@orgs_app.command("list")
def orgs_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every organization with its number of projects and live keys."""
    from sqlalchemy import func, select

    from tunehouse.store.tables import ApiKey, Organization, Project

    with _state(home) as state, state.db.session() as s:
        rows = []
        for org in s.scalars(select(Organization).order_by(Organization.seq)):
            n_projects = s.scalar(
                select(func.count()).select_from(Project).where(Project.organization_id == org.id)
            )
            n_keys = s.scalar(
                select(func.count())
                .select_from(ApiKey)
                .where(ApiKey.organization_id == org.id, ApiKey.revoked_at.is_(None))
            )
            rows.append(
                {
                    "id": org.id,
                    "name": org.name,
                    "created_at": org.created_at,
                    "projects": n_projects,
                    "api_keys": n_keys,
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "name", "projects", "keys", "created")
    for r in rows:
        table.add_row(r["id"], r["name"], str(r["projects"]), str(r["api_keys"]), _when(r["created_at"]))
    console.print(table)


@orgs_app.command("delete")
def orgs_delete(
    name: Annotated[str, typer.Argument(help="Organization name or id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    home: HomeOpt = None,
) -> None:
    """Delete an organization and everything it owns: keys, projects, files, jobs, models (rows and bytes)."""
    from tunehouse.tenancy.deletion import Stores, delete_organization

    with _state(home) as state:
        with state.db.session() as s:
            org = _org(s, name)
        if not yes:
            typer.confirm(f"Delete organization '{org.name}' and everything it owns?", abort=True)
        out = delete_organization(
            state.db,
            Stores.of(state),
            organization_id=org.id,
            actor=None,
        )
    console.print(
        f"Deleted organization {org.name}: {out.projects} project(s), {out.keys} key(s), {out.files} file(s), "
        f"{out.jobs} job(s), {out.checkpoints} model(s)/checkpoint(s)."
    )


# --- projects ----------------------------------------------------------------------------------


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Argument(help="Project name.")], org: OrgOpt = "default", home: HomeOpt = None
) -> None:
    """Create a project in an organization and print its id."""
    from tunehouse.errors import APIError
    from tunehouse.tenancy.projects import create_project

    with _state(home) as state, state.db.transaction() as s:
        organization = _org(s, org)
        try:
            row = create_project(s, organization_id=organization.id, name=name, actor=None)
        except APIError as e:
            raise _fail(e.message) from None
    typer.echo(row.id)


@projects_app.command("list")
def projects_list(
    org: OrgOpt = "default",
    all_: Annotated[bool, typer.Option("--all", help="Also archived projects.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The projects of an organization."""
    from tunehouse.store.tables import Project
    from tunehouse.tenancy.projects import list_projects

    with _state(home) as state, state.db.session() as s:
        organization = _org(s, org)
        stmt = list_projects(s, organization_id=organization.id, include_archived=all_).order_by(Project.seq)
        rows = [
            {
                "id": p.id,
                "name": p.name,
                "status": p.status,
                "default": p.is_default,
                "created_at": p.created_at,
            }
            for p in s.scalars(stmt)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "name", "status", "created")
    for r in rows:
        table.add_row(
            r["id"], r["name"] + (" (default)" if r["default"] else ""), r["status"], _when(r["created_at"])
        )
    console.print(table)


@projects_app.command("archive")
def projects_archive(
    project: Annotated[str, typer.Argument(help="Project name or id.")],
    org: OrgOpt = "default",
    home: HomeOpt = None,
) -> None:
    """Archive a project: its keys stop working; its objects stay (admin keys still see them)."""
    from tunehouse.errors import APIError
    from tunehouse.tenancy.projects import archive_project

    with _state(home) as state, state.db.transaction() as s:
        row = _project(s, _org(s, org), project)
        try:
            archive_project(s, row, actor=None)
        except APIError as e:
            raise _fail(e.message) from None
    console.print(f"Archived {row.id} ({row.name}).")


@projects_app.command("delete")
def projects_delete(
    project: Annotated[str, typer.Argument(help="Project name or id.")],
    org: OrgOpt = "default",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    home: HomeOpt = None,
) -> None:
    """Delete a project and everything it owns: keys, files, jobs, models (rows and bytes)."""
    from tunehouse.errors import APIError
    from tunehouse.tenancy.deletion import Stores, delete_project

    with _state(home) as state:
        with state.db.session() as s:
            organization = _org(s, org)
            row = _project(s, organization, project)
        if not yes:
            typer.confirm(f"Delete project '{row.name}' and everything it owns?", abort=True)
        try:
            out = delete_project(
                state.db,
                Stores.of(state),
                organization_id=organization.id,
                project_id=row.id,
                actor=None,
            )
        except APIError as e:
            raise _fail(e.message) from None
    console.print(
        f"Deleted project {row.name}: {out.keys} key(s), {out.files} file(s), {out.jobs} job(s), "
        f"{out.checkpoints} model(s)/checkpoint(s)."
    )


# --- audit -------------------------------------------------------------------------------------


def audit_cmd(
    org: OrgOpt = "default",
    limit: Annotated[int, typer.Option(help="The newest N entries.")] = 50,
    action: Annotated[list[str] | None, typer.Option(help="Only these actions (repeatable).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log of an organization, newest first (also for deleted organizations, by id)."""
    from sqlalchemy import select

    from tunehouse.store.tables import AuditLog, Organization
    from tunehouse.tenancy import audit

    with _state(home) as state, state.db.session() as s:
        org_id = (
            s.scalar(select(Organization.id).where((Organization.name == org) | (Organization.id == org)))
            or org
        )
        stmt = (
            audit.entries(s, organization_id=org_id, actions=action or None)
            .order_by(AuditLog.seq.desc())
            .limit(limit)
        )
        rows = [
            {
                "id": r.id,
                "created_at": r.created_at,
                "action": r.action,
                "object_id": r.object_id,
                "project_id": r.project_id,
                "actor": r.actor_key_id or r.actor_type,
                "details": r.details,
            }
            for r in s.scalars(stmt)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("when", "action", "object", "project", "actor", "details")
    for r in rows:
        table.add_row(
            _when(r["created_at"]), r["action"], r["object_id"] or "-", r["project_id"] or "-", r["actor"],
            json.dumps(r["details"]) if r["details"] else "",
        )  # fmt: skip
    console.print(table if rows else f"No audit entries for '{org}'.")
