"""Who sees what. Every service query that touches a tenant's rows starts from these.

- Organization: the boundary. Rows of another organization are never selected, so callers answer
  404 and lists never show them.
- Project: a project key (Principal.project_id set) sees only rows of its project; an
  organization admin key sees every project of its organization.
- Checkpoint permissions add fine-tuned models shared with the caller's project (possibly by
  another organization): usable for chat and listed in /v1/models, never deletable by the grantee.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, and_, false, or_, select
from sqlalchemy.orm import Session

from tunehouse.store.tables import Checkpoint, CheckpointPermission, File, Job, Project, now

if TYPE_CHECKING:
    from tunehouse.tenancy.auth import Principal


def scoped(table: Any, principal: Principal) -> Select:
    """select(table) limited to what the caller may see (table has organization_id and project_id)."""
    stmt = select(table).where(table.organization_id == principal.organization_id)
    if principal.project_id is not None:
        stmt = stmt.where(table.project_id == principal.project_id)
    return stmt


def result_file_ids(session: Session, *, organization_id: str, project_id: str) -> list[str]:
    """Result files of the project's jobs. The worker writes them without a project (it knows only
    the organization), so they belong to the project through their job."""
    out: list[str] = []
    for files in session.scalars(
        select(Job.result_files).where(Job.organization_id == organization_id, Job.project_id == project_id)
    ):
        out += list(files or [])
    return out


def scoped_files(session: Session, principal: Principal) -> Select:
    # A file past its `expires_at` is gone for the API at once, before the sweeper deletes it.
    stmt = select(File).where(
        File.organization_id == principal.organization_id,
        or_(File.expires_at.is_(None), File.expires_at > now()),
    )
    if principal.project_id is not None:
        results = result_file_ids(
            session, organization_id=principal.organization_id, project_id=principal.project_id
        )
        stmt = stmt.where(
            or_(
                File.project_id == principal.project_id,
                and_(File.project_id.is_(None), File.id.in_(results)) if results else false(),
            )
        )
    return stmt


def _grantee_projects(principal: Principal):
    if principal.project_id is not None:
        return [principal.project_id]
    return select(Project.id).where(Project.organization_id == principal.organization_id)


def shared_checkpoints(principal: Principal) -> Select:
    """Checkpoints other projects shared with the caller's project (admin keys: any of its projects)."""
    granted = select(CheckpointPermission.checkpoint_id).where(
        CheckpointPermission.project_id.in_(_grantee_projects(principal))
    )
    return select(Checkpoint).where(Checkpoint.id.in_(granted))


def own_checkpoint(session: Session, principal: Principal, name: str) -> Checkpoint | None:
    """A fine-tuned model or checkpoint (by model name) the caller owns."""
    return session.scalar(scoped(Checkpoint, principal).where(Checkpoint.model_name == name))


def usable_checkpoint(session: Session, principal: Principal, name: str) -> Checkpoint | None:
    """A model the caller may run: its own, or one shared with its project."""
    return own_checkpoint(session, principal, name) or session.scalar(
        shared_checkpoints(principal).where(Checkpoint.model_name == name)
    )


def usable_checkpoints(session: Session, principal: Principal) -> list[Checkpoint]:
    """Own and shared models, in creation order, each once."""
    rows = {c.id: c for c in session.scalars(scoped(Checkpoint, principal))}
    for c in session.scalars(shared_checkpoints(principal)):
        rows.setdefault(c.id, c)
    return sorted(rows.values(), key=lambda c: c.seq)
