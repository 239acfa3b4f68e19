"""/v1/organization/... (projects, project keys, admin keys, audit logs) and
/v1/fine_tuning/checkpoints/{model}/permissions. Thin: parse, call the service, return."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tunehouse.api.deps import AdminDep, OrgDep, SessionDep, StateDep
from tunehouse.api.organization import protocol as wire
from tunehouse.api.organization import service
from tunehouse.errors import InvalidRequest

router = APIRouter(prefix="/v1/organization", tags=["organization"])
permissions_router = APIRouter(prefix="/v1/fine_tuning/checkpoints", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.get("/projects", response_model=wire.ProjectList)
def list_projects(
    session: SessionDep,
    principal: AdminDep,
    after: str | None = None,
    limit: Limit = 20,
    include_archived: bool = False,
) -> wire.ProjectList:
    return service.list_projects(
        session, principal=principal, after=after, limit=limit, include_archived=include_archived
    )


@router.post("/projects", response_model=wire.Project)
def create_project(req: wire.ProjectCreateRequest, session: SessionDep, principal: AdminDep) -> wire.Project:
    return service.create_project(session, principal=principal, name=req.name)


@router.get("/projects/{project_id}", response_model=wire.Project)
def retrieve_project(project_id: str, session: SessionDep, principal: OrgDep) -> wire.Project:
    return service.retrieve_project(session, principal=principal, project_id=project_id)


@router.post("/projects/{project_id}", response_model=wire.Project)
def modify_project(
    project_id: str, req: wire.ProjectUpdateRequest, session: SessionDep, principal: AdminDep
) -> wire.Project:
    return service.modify_project(session, principal=principal, project_id=project_id, name=req.name)


@router.post("/projects/{project_id}/archive", response_model=wire.Project)
def archive_project(project_id: str, session: SessionDep, principal: AdminDep) -> wire.Project:
    return service.archive_project(session, principal=principal, project_id=project_id)


@router.delete("/projects/{project_id}", response_model=wire.ProjectDeleted)
async def delete_project(project_id: str, state: StateDep, principal: AdminDep) -> wire.ProjectDeleted:
    """tunehouse extension: delete the project and everything it owns (rows and bytes)."""
    return await run_in_threadpool(service.delete_project, state, principal=principal, project_id=project_id)


@router.get("/projects/{project_id}/api_keys", response_model=wire.ProjectApiKeyList)
def list_project_keys(
    project_id: str, session: SessionDep, principal: OrgDep, after: str | None = None, limit: Limit = 20
) -> wire.ProjectApiKeyList:
    return service.list_project_keys(
        session, principal=principal, project_id=project_id, after=after, limit=limit
    )


@router.post("/projects/{project_id}/api_keys", response_model=wire.ProjectApiKey)
def create_project_key(
    project_id: str, req: wire.ProjectApiKeyCreateRequest, session: SessionDep, principal: OrgDep
) -> wire.ProjectApiKey:
    """tunehouse extension: the answer's `value` is the key, shown this once."""
    return service.create_project_key(session, principal=principal, project_id=project_id, req=req)


@router.get("/projects/{project_id}/api_keys/{key_id}", response_model=wire.ProjectApiKey)
def retrieve_project_key(
    project_id: str, key_id: str, session: SessionDep, principal: OrgDep
) -> wire.ProjectApiKey:
    return service.retrieve_project_key(session, principal=principal, project_id=project_id, key_id=key_id)


@router.delete("/projects/{project_id}/api_keys/{key_id}", response_model=wire.ProjectApiKeyDeleted)
def delete_project_key(
    project_id: str, key_id: str, session: SessionDep, principal: OrgDep
) -> wire.ProjectApiKeyDeleted:
    return service.delete_project_key(session, principal=principal, project_id=project_id, key_id=key_id)


@router.post("/projects/{project_id}/api_keys/{key_id}/rotate", response_model=wire.ProjectApiKey)
def rotate_project_key(
    project_id: str, key_id: str, session: SessionDep, principal: OrgDep
) -> wire.ProjectApiKey:
    """tunehouse extension: a new key replaces this one (revoked in the same transaction)."""
    return service.rotate_project_key(session, principal=principal, project_id=project_id, key_id=key_id)


@router.get("/admin_api_keys", response_model=wire.AdminApiKeyList)
def list_admin_keys(
    session: SessionDep,
    principal: AdminDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
) -> wire.AdminApiKeyList:
    return service.list_admin_keys(session, principal=principal, after=after, limit=limit, order=order)


@router.post("/admin_api_keys", response_model=wire.AdminApiKey)
def create_admin_key(
    req: wire.AdminApiKeyCreateRequest, session: SessionDep, principal: AdminDep
) -> wire.AdminApiKey:
    return service.create_admin_key(session, principal=principal, name=req.name)


@router.get("/admin_api_keys/{key_id}", response_model=wire.AdminApiKey)
def retrieve_admin_key(key_id: str, session: SessionDep, principal: AdminDep) -> wire.AdminApiKey:
    return service.retrieve_admin_key(session, principal=principal, key_id=key_id)


@router.delete("/admin_api_keys/{key_id}", response_model=wire.AdminApiKeyDeleted)
def delete_admin_key(key_id: str, session: SessionDep, principal: AdminDep) -> wire.AdminApiKeyDeleted:
    return service.delete_admin_key(session, principal=principal, key_id=key_id)


@router.post("/admin_api_keys/{key_id}/rotate", response_model=wire.AdminApiKey)
def rotate_admin_key(key_id: str, session: SessionDep, principal: AdminDep) -> wire.AdminApiKey:
    """tunehouse extension."""
    return service.rotate_admin_key(session, principal=principal, key_id=key_id)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': expected an integer.", param=name) from None


@router.get("/audit_logs", response_model=wire.AuditLogList)
def list_audit_logs(
    request: Request,
    session: SessionDep,
    principal: AdminDep,
    after: str | None = None,
    before: str | None = None,
    limit: Limit = 20,
) -> wire.AuditLogList:
    q = request.query_params
    return service.list_audit_logs(
        session,
        principal=principal,
        after=after,
        before=before,
        limit=limit,
        # OpenAI's array (`event_types[]=...`) and deepObject (`effective_at[gte]=...`) parameters.
        actions=q.getlist("event_types[]") or None,
        project_ids=q.getlist("project_ids[]") or None,
        resource_ids=q.getlist("resource_ids[]") or None,
        actor_ids=q.getlist("actor_ids[]") or None,
        **{op: _int_param(request, f"effective_at[{op}]") for op in ("gt", "gte", "lt", "lte")},
    )


@permissions_router.post("/{checkpoint:path}/permissions", response_model=wire.CheckpointPermissionList)
def create_permissions(
    checkpoint: str, req: wire.CheckpointPermissionCreateRequest, session: SessionDep, principal: OrgDep
) -> wire.CheckpointPermissionList:
    return service.create_permissions(
        session, principal=principal, checkpoint=checkpoint, project_ids=req.project_ids
    )


@permissions_router.get("/{checkpoint:path}/permissions", response_model=wire.CheckpointPermissionList)
def list_permissions(
    checkpoint: str,
    session: SessionDep,
    principal: OrgDep,
    project_id: str | None = None,
    after: str | None = None,
    limit: Limit = 10,
    order: Literal["ascending", "descending"] = "descending",
) -> wire.CheckpointPermissionList:
    return service.list_permissions(
        session,
        principal=principal,
        checkpoint=checkpoint,
        project_id=project_id,
        after=after,
        limit=limit,
        order=order,
    )


@permissions_router.delete(
    "/{checkpoint:path}/permissions/{permission_id}", response_model=wire.CheckpointPermissionDeleted
)
def delete_permission(
    checkpoint: str, permission_id: str, session: SessionDep, principal: OrgDep
) -> wire.CheckpointPermissionDeleted:
    return service.delete_permission(
        session, principal=principal, checkpoint=checkpoint, permission_id=permission_id
    )
