"""/v1/organization/base_models (tunehouse extension): register, list, retrieve and remove your own
base models. Thin: parse, call the service, return."""

from __future__ import annotations

from fastapi import APIRouter

from tunehouse.api.base_models import protocol as wire
from tunehouse.api.base_models import service
from tunehouse.api.deps import AdminDep, SessionDep, StateDep

router = APIRouter(prefix="/v1/organization/base_models", tags=["base models"])


@router.get("", response_model=wire.RegisteredBaseModelList)
def list_base_models(session: SessionDep, principal: AdminDep) -> wire.RegisteredBaseModelList:
    return service.list_all(session, principal=principal)


@router.post("", response_model=wire.RegisteredBaseModel)
def add_base_model(
    req: wire.BaseModelCreateRequest, state: StateDep, session: SessionDep, principal: AdminDep
) -> wire.RegisteredBaseModel:
    """Checks, copies (or converts) and registers the model: seconds to minutes, in a worker thread."""
    return service.add(state, session, principal=principal, req=req)


@router.get("/{name}", response_model=wire.RegisteredBaseModel)
def retrieve_base_model(name: str, session: SessionDep, principal: AdminDep) -> wire.RegisteredBaseModel:
    return service.retrieve(session, principal=principal, name=name)


@router.delete("/{name}", response_model=wire.RegisteredBaseModelDeleted)
def remove_base_model(
    name: str, state: StateDep, session: SessionDep, principal: AdminDep
) -> wire.RegisteredBaseModelDeleted:
    return service.remove(state, session, principal=principal, name=name)
