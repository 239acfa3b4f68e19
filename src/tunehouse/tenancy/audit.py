"""The audit log: key, project, permission and deletion actions, one row each, written in the
caller's transaction so that an action and its record commit (or roll back) together."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.store.tables import AuditLog, now

if TYPE_CHECKING:
    from tunehouse.tenancy.auth import Principal


def record(
    session: Session,
    *,
    organization_id: str,
    action: str,
    object_id: str | None,
    actor: Principal | None,
    project_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditLog:
    """Add one entry. `actor` None means the command line (someone with the database itself)."""
    if actor is None:
        actor_type, actor_key_id = "cli", None
    elif actor.key_id is None:
        actor_type, actor_key_id = "admin_key", None  # TUNEHOUSE_ADMIN_KEY from the settings
    else:
        actor_type, actor_key_id = "api_key", actor.key_id
    created = now()
    row = AuditLog(
        id=ids.audit_log_id(created),
        organization_id=organization_id,
        project_id=project_id,
        actor_key_id=actor_key_id,
        actor_type=actor_type,
        action=action,
        object_id=object_id,
        details=details,
        created_at=created,
    )
    session.add(row)
    return row


def entries(
    session: Session,
    *,
    organization_id: str,
    actions: list[str] | None = None,
    project_ids: list[str] | None = None,
    resource_ids: list[str] | None = None,
    actor_ids: list[str] | None = None,
    gt: int | None = None,
    gte: int | None = None,
    lt: int | None = None,
    lte: int | None = None,
):
    """A select of the organization's entries with OpenAI's audit-log filters (newest first is the
    caller's ordering)."""
    stmt = select(AuditLog).where(AuditLog.organization_id == organization_id)
    if actions:
        stmt = stmt.where(AuditLog.action.in_(actions))
    if project_ids:
        stmt = stmt.where(AuditLog.project_id.in_(project_ids))
    if resource_ids:
        stmt = stmt.where(AuditLog.object_id.in_(resource_ids))
    if actor_ids:
        stmt = stmt.where(AuditLog.actor_key_id.in_(actor_ids))
    if gt is not None:
        stmt = stmt.where(AuditLog.created_at > gt)
    if gte is not None:
        stmt = stmt.where(AuditLog.created_at >= gte)
    if lt is not None:
        stmt = stmt.where(AuditLog.created_at < lt)
    if lte is not None:
        stmt = stmt.where(AuditLog.created_at <= lte)
    return stmt
