"""The administration API: projects, their keys, admin keys, the audit log, checkpoint permissions.

Who may do what:
- organization admin keys (project_id NULL): everything in their organization (the routes of
  what only they may do take `AdminDep`; checkpoint permissions check `require_admin` here, after
  the model is found);
- a project's owner keys: read their project and manage its keys;
- anything else: 403 for an endpoint of the organization, 404 for another project's objects
  (a project key does not see other projects), and another organization's objects are never found.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.api.organization import protocol as wire
from tunehouse.api.pagination import page
from tunehouse.api.state import AppState
from tunehouse.errors import InvalidRequest, NotFound, PermissionDenied
from tunehouse.store.tables import ApiKey, AuditLog, Checkpoint, CheckpointPermission, Project
from tunehouse.tenancy import audit, auth, deletion, projects
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import own_checkpoint


def _page_wire(rows, has_more, to_wire) -> dict:
    data = [to_wire(r) for r in rows]
    return {
        "data": data,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": has_more,
    }


# --- projects ----------------------------------------------------------------------------------


def project_to_wire(row: Project) -> wire.Project:
    return wire.Project(
        id=row.id, name=row.name, created_at=row.created_at, archived_at=row.archived_at, status=row.status
    )


def _visible_project(session: Session, principal: Principal, project_id: str, *, manage: bool) -> Project:
    """The project, if the caller may see it (`manage`: and manage its keys)."""
    if not principal.is_admin and principal.project_id != project_id:
        raise NotFound(f"No such project: {project_id}", param="project_id")
    row = projects.project_in_org(session, organization_id=principal.organization_id, project_id=project_id)
    if manage and not principal.is_admin and principal.role != "owner":
        raise PermissionDenied(
            auth.INSUFFICIENT
            + " Managing a project's keys needs an owner key of the project or an admin key.",
            code="insufficient_permissions",
        )
    return row


def list_projects(
    session: Session, *, principal: Principal, after: str | None, limit: int, include_archived: bool
) -> wire.ProjectList:
    stmt = projects.list_projects(
        session, organization_id=principal.organization_id, include_archived=include_archived
    )
    rows, has_more = page(session, stmt, Project, after=after, limit=limit, descending=False)
    return wire.ProjectList(**_page_wire(rows, has_more, project_to_wire))


def create_project(session: Session, *, principal: Principal, name: str) -> wire.Project:
    row = projects.create_project(
        session, organization_id=principal.organization_id, name=name, actor=principal
    )
    session.commit()
    return project_to_wire(row)


def retrieve_project(session: Session, *, principal: Principal, project_id: str) -> wire.Project:
    return project_to_wire(_visible_project(session, principal, project_id, manage=False))


def modify_project(session: Session, *, principal: Principal, project_id: str, name: str) -> wire.Project:
    row = _visible_project(session, principal, project_id, manage=True)
    projects.rename_project(session, row, name=name, actor=principal)
    session.commit()
    return project_to_wire(row)


def archive_project(session: Session, *, principal: Principal, project_id: str) -> wire.Project:
    row = _visible_project(session, principal, project_id, manage=True)
    projects.archive_project(session, row, actor=principal)
    session.commit()
    return project_to_wire(row)


def stores(state: AppState) -> deletion.Stores:
    return deletion.Stores.of(state)


def delete_project(state: AppState, *, principal: Principal, project_id: str) -> wire.ProjectDeleted:
    out = deletion.delete_project(
        state.db,
        stores(state),
        organization_id=principal.organization_id,
        project_id=project_id,
        actor=principal,
    )
    return wire.ProjectDeleted(
        id=project_id,
        deleted=True,
        files=out.files,
        jobs=out.jobs,
        checkpoints=out.checkpoints,
        api_keys=out.keys,
    )


# --- keys --------------------------------------------------------------------------------------


def _owner(row: ApiKey) -> wire.KeyOwner:
    return wire.KeyOwner(id=row.id, name=row.name, created_at=row.created_at, role=row.role)


def project_key_to_wire(row: ApiKey, value: str | None = None) -> wire.ProjectApiKey:
    return wire.ProjectApiKey(
        redacted_value=auth.redacted(row),
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        id=row.id,
        owner=wire.ProjectKeyOwner(service_account=_owner(row)),
        role=row.role,
        project_id=row.project_id,
        value=value,
    )


def admin_key_to_wire(row: ApiKey, value: str | None = None) -> wire.AdminApiKey:
    return wire.AdminApiKey(
        id=row.id,
        name=row.name,
        redacted_value=auth.redacted(row),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        owner=_owner(row),
        value=value,
    )


def _live_keys(principal: Principal, project_id: str | None):
    stmt = select(ApiKey).where(
        ApiKey.organization_id == principal.organization_id, ApiKey.revoked_at.is_(None)
    )
    return stmt.where(ApiKey.project_id == project_id if project_id else ApiKey.project_id.is_(None))


def list_project_keys(
    session: Session, *, principal: Principal, project_id: str, after: str | None, limit: int
) -> wire.ProjectApiKeyList:
    _visible_project(session, principal, project_id, manage=True)
    rows, has_more = page(
        session, _live_keys(principal, project_id), ApiKey, after=after, limit=limit, descending=False
    )
    return wire.ProjectApiKeyList(**_page_wire(rows, has_more, project_key_to_wire))


def create_project_key(
    session: Session, *, principal: Principal, project_id: str, req: wire.ProjectApiKeyCreateRequest
) -> wire.ProjectApiKey:
    _visible_project(session, principal, project_id, manage=True)
    row, plain = auth.create_key(
        session,
        organization_id=principal.organization_id,
        project_id=project_id,
        name=req.name,
        role=req.role,
        actor=principal,
    )
    session.commit()
    return project_key_to_wire(row, plain)


def _project_key(session: Session, principal: Principal, project_id: str, key_id: str) -> ApiKey:
    """A live key of a project whose keys the caller may manage."""
    _visible_project(session, principal, project_id, manage=True)
    return auth.get_key(
        session, organization_id=principal.organization_id, key_id=key_id, project_id=project_id
    )


def _admin_key(session: Session, principal: Principal, key_id: str) -> ApiKey:
    return auth.get_key(session, organization_id=principal.organization_id, key_id=key_id, project_id=None)


def _revoke(session: Session, principal: Principal, row: ApiKey) -> None:
    auth.revoke_key(session, row.id, organization_id=principal.organization_id, actor=principal)
    session.commit()


def _rotate(session: Session, principal: Principal, row: ApiKey) -> tuple[ApiKey, str]:
    new, plain = auth.rotate_key(session, row, actor=principal)
    session.commit()
    return new, plain


def retrieve_project_key(
    session: Session, *, principal: Principal, project_id: str, key_id: str
) -> wire.ProjectApiKey:
    return project_key_to_wire(_project_key(session, principal, project_id, key_id))


def delete_project_key(
    session: Session, *, principal: Principal, project_id: str, key_id: str
) -> wire.ProjectApiKeyDeleted:
    _revoke(session, principal, _project_key(session, principal, project_id, key_id))
    return wire.ProjectApiKeyDeleted(id=key_id, deleted=True)


def rotate_project_key(
    session: Session, *, principal: Principal, project_id: str, key_id: str
) -> wire.ProjectApiKey:
    return project_key_to_wire(
        *_rotate(session, principal, _project_key(session, principal, project_id, key_id))
    )


def list_admin_keys(
    session: Session, *, principal: Principal, after: str | None, limit: int, order: str
) -> wire.AdminApiKeyList:
    rows, has_more = page(
        session, _live_keys(principal, None), ApiKey, after=after, limit=limit, descending=order == "desc"
    )
    return wire.AdminApiKeyList(**_page_wire(rows, has_more, admin_key_to_wire))


def create_admin_key(session: Session, *, principal: Principal, name: str) -> wire.AdminApiKey:
    row, plain = auth.create_key(
        session, organization_id=principal.organization_id, name=name, actor=principal
    )
    session.commit()
    return admin_key_to_wire(row, plain)


def retrieve_admin_key(session: Session, *, principal: Principal, key_id: str) -> wire.AdminApiKey:
    return admin_key_to_wire(_admin_key(session, principal, key_id))


def delete_admin_key(session: Session, *, principal: Principal, key_id: str) -> wire.AdminApiKeyDeleted:
    _revoke(session, principal, _admin_key(session, principal, key_id))
    return wire.AdminApiKeyDeleted(id=key_id, deleted=True)


def rotate_admin_key(session: Session, *, principal: Principal, key_id: str) -> wire.AdminApiKey:
    return admin_key_to_wire(*_rotate(session, principal, _admin_key(session, principal, key_id)))


# --- audit log ---------------------------------------------------------------------------------


def audit_to_wire(row: AuditLog, project_names: dict[str, str]) -> dict:
    """OpenAI's audit log object: the details sit under a key named like the event type."""
    if row.actor_type == "api_key":
        actor = {"type": "api_key", "api_key": {"id": row.actor_key_id, "type": "service_account"}}
    elif row.actor_type == "admin_key":
        actor = {"type": "api_key", "api_key": {"id": "TUNEHOUSE_ADMIN_KEY", "type": "service_account"}}
    else:
        actor = {"type": "session", "session": {"user": {"id": "tunehouse-cli"}}}
    out = {
        "id": row.id,
        "object": "organization.audit_log",
        "type": row.action,
        "effective_at": row.created_at,
    }
    if row.project_id:
        out["project"] = {"id": row.project_id, "name": project_names.get(row.project_id)}
    out["actor"] = actor
    out[row.action] = {"id": row.object_id, "data": row.details or {}}
    return out


def list_audit_logs(
    session: Session, *, principal: Principal, after: str | None, before: str | None, limit: int, **filters
) -> wire.AuditLogList:
    stmt = audit.entries(session, organization_id=principal.organization_id, **filters)
    if before is not None:
        cursor = session.scalar(stmt.with_only_columns(AuditLog.seq).where(AuditLog.id == before))
        if cursor is None:
            raise InvalidRequest(
                f"Invalid 'before': no object with id '{before}' in this list.", param="before"
            )
        stmt = stmt.where(AuditLog.seq > cursor)
    rows, has_more = page(session, stmt, AuditLog, after=after, limit=limit)
    names = {
        pid: pname
        for pid, pname in session.execute(
            select(Project.id, Project.name).where(Project.organization_id == principal.organization_id)
        )
    }
    data = [audit_to_wire(r, names) for r in rows]
    return wire.AuditLogList(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=has_more,
    )


# --- checkpoint permissions --------------------------------------------------------------------


def _checkpoint(session: Session, principal: Principal, name: str) -> Checkpoint:
    row = own_checkpoint(session, principal, name)
    if row is None:
        # The same answer as for a model that does not exist: another organization's stays unseen
        # (and its keys get 404, not 403, whatever their role).
        raise NotFound(
            f"The model `{name}` does not exist or you do not have access to it.",
            param="fine_tuned_model_checkpoint",
            code="model_not_found",
        )
    auth.require_admin(principal)
    return row


def permission_to_wire(row: CheckpointPermission) -> wire.CheckpointPermission:
    return wire.CheckpointPermission(id=row.id, created_at=row.created_at, project_id=row.project_id)


def create_permissions(
    session: Session, *, principal: Principal, checkpoint: str, project_ids: list[str]
) -> wire.CheckpointPermissionList:
    """Share with projects. A project id is enough, whatever its organization (OpenAI shares
    across organizations the same way); sharing twice with a project returns the same permission."""
    ckpt = _checkpoint(session, principal, checkpoint)
    out: list[CheckpointPermission] = []
    for i, project_id in enumerate(dict.fromkeys(project_ids)):
        project = session.scalar(select(Project).where(Project.id == project_id, Project.status == "active"))
        if project is None:
            raise InvalidRequest(
                f"No such active project: {project_id}", param=f"project_ids[{i}]", code="invalid_value"
            )
        existing = session.scalar(
            select(CheckpointPermission).where(
                CheckpointPermission.checkpoint_id == ckpt.id, CheckpointPermission.project_id == project_id
            )
        )
        if existing is not None:
            out.append(existing)
            continue
        row = CheckpointPermission(
            id=ids.permission_id(),
            organization_id=ckpt.organization_id,
            checkpoint_id=ckpt.id,
            project_id=project_id,
        )
        session.add(row)
        out.append(row)
        audit.record(
            session,
            organization_id=ckpt.organization_id,
            project_id=ckpt.project_id,
            actor=principal,
            action="checkpoint.permission.created",
            object_id=row.id,
            details={"project_id": project_id, "fine_tuned_model_checkpoint": ckpt.model_name},
        )
    try:
        session.commit()
    except IntegrityError:  # the same share made concurrently: nothing half-made, ask again
        session.rollback()
        raise InvalidRequest("The permission was changed concurrently; retry.", param="project_ids") from None
    data = [permission_to_wire(r) for r in out]
    return wire.CheckpointPermissionList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=False,
    )


def list_permissions(
    session: Session,
    *,
    principal: Principal,
    checkpoint: str,
    project_id: str | None,
    after: str | None,
    limit: int,
    order: str,
) -> wire.CheckpointPermissionList:
    ckpt = _checkpoint(session, principal, checkpoint)
    stmt = select(CheckpointPermission).where(CheckpointPermission.checkpoint_id == ckpt.id)
    if project_id:
        stmt = stmt.where(CheckpointPermission.project_id == project_id)
    rows, has_more = page(
        session, stmt, CheckpointPermission, after=after, limit=limit, descending=order == "descending"
    )
    return wire.CheckpointPermissionList(**_page_wire(rows, has_more, permission_to_wire))


def delete_permission(
    session: Session, *, principal: Principal, checkpoint: str, permission_id: str
) -> wire.CheckpointPermissionDeleted:
    ckpt = _checkpoint(session, principal, checkpoint)
    row = session.scalar(
        select(CheckpointPermission).where(
            CheckpointPermission.id == permission_id, CheckpointPermission.checkpoint_id == ckpt.id
        )
    )
    if row is None:
        raise NotFound(f"No such checkpoint permission: {permission_id}", param="permission_id")
    session.delete(row)
    audit.record(
        session,
        organization_id=ckpt.organization_id,
        project_id=ckpt.project_id,
        actor=principal,
        action="checkpoint.permission.deleted",
        object_id=permission_id,
        details={"project_id": row.project_id, "fine_tuned_model_checkpoint": ckpt.model_name},
    )
    session.commit()
    return wire.CheckpointPermissionDeleted(id=permission_id, deleted=True)
