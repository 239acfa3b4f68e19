"""Registered base models over HTTP: the server administrator's (TUNEHOUSE_ADMIN_KEY) counterpart of
`tunehouse models add|list|remove`. Adding reads a path on the server and makes a model usable by
organizations, so an organization's own admin keys may not: they could register another
organization's files as a model."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.api.base_models import protocol as wire
from tunehouse.api.state import AppState
from tunehouse.errors import InvalidRequest, PermissionDenied
from tunehouse.store import registry
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.projects import find_org


def _require_server_admin(principal: Principal) -> None:
    if principal.key_id is not None:
        raise PermissionDenied(
            "Registering base models needs the server's admin key (TUNEHOUSE_ADMIN_KEY); an "
            "organization's keys may not (or use `tunehouse models` on the server).",
            code="insufficient_permissions",
        )


def _wire(row) -> wire.RegisteredBaseModel:
    return wire.RegisteredBaseModel(**registry.describe(row))


def add(
    state: AppState, session: Session, *, principal: Principal, req: wire.BaseModelCreateRequest
) -> wire.RegisteredBaseModel:
    _require_server_admin(principal)
    org_ids = None
    if req.organizations:
        org_ids = []
        for i, name in enumerate(req.organizations):
            org = find_org(session, name)
            if org is None:
                raise InvalidRequest(f"No organization named {name!r}.", param=f"organizations[{i}]")
            org_ids.append(org.id)
    row = registry.add_model(
        session,
        state.settings,
        source=Path(req.path),
        name=req.name,
        chat_template=req.chat_template,
        organizations=org_ids,
    )
    return _wire(row)


def list_all(session: Session, *, principal: Principal) -> wire.RegisteredBaseModelList:
    _require_server_admin(principal)
    return wire.RegisteredBaseModelList(data=[_wire(r) for r in registry.list_models(session)])


def retrieve(session: Session, *, principal: Principal, name: str) -> wire.RegisteredBaseModel:
    _require_server_admin(principal)
    return _wire(registry.get_model(session, name))


def remove(
    state: AppState, session: Session, *, principal: Principal, name: str
) -> wire.RegisteredBaseModelDeleted:
    _require_server_admin(principal)
    row = registry.remove_model(session, state.settings, name)
    return wire.RegisteredBaseModelDeleted(id=row.id, name=row.name, deleted=True)
