from __future__ import annotations

from fastapi import APIRouter

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.models import service
from tunehouse.api.models.protocol import Model, ModelDeleted, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(state: StateDep, session: SessionDep, principal: OrgDep) -> ModelList:
    return service.list_models(state, session, principal=principal)


# `:path` because fine-tuned names contain colons and clients may percent-encode slashes.
@router.get("/{model:path}", response_model=Model)
def retrieve_model(model: str, state: StateDep, session: SessionDep, principal: OrgDep) -> Model:
    return service.retrieve_model(state, session, principal=principal, model=model)


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(model: str, state: StateDep, session: SessionDep, principal: OrgDep) -> ModelDeleted:
    return service.delete_model(state, session, principal=principal, model=model)
