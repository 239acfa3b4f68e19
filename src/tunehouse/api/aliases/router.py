"""/v1/organization/model_aliases (tunehouse extension): an organization admin key manages the
organization's model aliases. Thin: parse, call the service, return."""

from __future__ import annotations

from fastapi import APIRouter

from tunehouse.api.aliases import service
from tunehouse.api.aliases.protocol import CreateAliasRequest, ModelAlias, ModelAliasDeleted, ModelAliasList
from tunehouse.api.deps import AdminDep, SessionDep, StateDep

router = APIRouter(prefix="/v1/organization/model_aliases", tags=["organization"])


@router.get("", response_model=ModelAliasList)
def list_aliases(state: StateDep, session: SessionDep, principal: AdminDep) -> ModelAliasList:
    return service.list_aliases(state.settings, session, principal=principal)


@router.post("", response_model=ModelAlias)
def create_alias(
    req: CreateAliasRequest, state: StateDep, session: SessionDep, principal: AdminDep
) -> ModelAlias:
    return service.create_alias(
        state.settings, session, principal=principal, name=req.name, target=req.target
    )


# `:path`: aliases of fine-tuned names contain colons, and clients may percent-encode slashes.
@router.get("/{name:path}", response_model=ModelAlias)
def retrieve_alias(name: str, state: StateDep, session: SessionDep, principal: AdminDep) -> ModelAlias:
    return service.get_alias(state.settings, session, principal=principal, name=name)


@router.delete("/{name:path}", response_model=ModelAliasDeleted)
def delete_alias(name: str, session: SessionDep, principal: AdminDep) -> ModelAliasDeleted:
    return service.delete_alias(session, principal=principal, name=name)
