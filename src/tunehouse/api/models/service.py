"""Models: the base catalog plus the organization's fine-tuned models and checkpoints, and its
model aliases (api/aliases: listed as models whose id is the alias, owned_by the organization)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from tunehouse.api.aliases.service import find_alias, listed_aliases, resolve_model_name
from tunehouse.api.models.protocol import Model, ModelDeleted, ModelList
from tunehouse.api.state import AppState
from tunehouse.errors import ModelNotFound, PermissionDenied
from tunehouse.inference.engine import ModelRef
from tunehouse.store.catalog import base_model_entries, is_base_model, resolve_base_model
from tunehouse.tenancy import audit
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import own_checkpoint, usable_checkpoint, usable_checkpoints

# Fine-tuned models are the caller's own (its project's, or its organization's for an admin key)
# plus those shared with its project through checkpoint permissions (tenancy/scope.py).


def list_models(state: AppState, session: Session, *, principal: Principal) -> ModelList:
    bases = base_model_entries(state.settings, session=session, organization_id=principal.organization_id)
    data = [Model(id=b.name, created=b.created, owned_by=b.owned_by) for b in bases]
    rows = usable_checkpoints(session, principal)
    data += [Model(id=c.model_name, created=c.created_at, owned_by=c.organization_id) for c in rows]
    aliases = listed_aliases(state.settings, session, principal=principal)
    data += [Model(id=a.name, created=a.created_at, owned_by=a.organization_id) for a in aliases]
    return ModelList(data=data)


def retrieve_model(state: AppState, session: Session, *, principal: Principal, model: str) -> Model:
    # Looked up in the list, not resolved: resolving the default model would convert it (seconds).
    bases = base_model_entries(state.settings, session=session, organization_id=principal.organization_id)
    base = next((b for b in bases if b.name == model), None)
    if base is not None:
        return Model(id=model, created=base.created, owned_by=base.owned_by)
    row = usable_checkpoint(session, principal, model)
    if row is None:
        alias = find_alias(session, principal.organization_id, model)
        if alias is not None:
            resolve_model_name(
                state.settings, session, principal=principal, model=model
            )  # 404 if it leads nowhere
            return Model(id=alias.name, created=alias.created_at, owned_by=alias.organization_id)
        raise ModelNotFound(model)
    return Model(id=row.model_name, created=row.created_at, owned_by=row.organization_id)


def delete_model(state: AppState, session: Session, *, principal: Principal, model: str) -> ModelDeleted:
    row = own_checkpoint(session, principal, model)
    if row is None:
        if is_base_model(state.settings, model, session=session, organization_id=principal.organization_id):
            raise PermissionDenied(
                f"Base model `{model}` cannot be deleted; only fine-tuned models can.",
                param="model",
                code="model_not_deletable",
            )
        if find_alias(session, principal.organization_id, model) is not None:
            raise PermissionDenied(
                f"`{model}` is a model alias; remove it with DELETE /v1/organization/model_aliases/{model} "
                "(or `tunehouse aliases remove`).",
                param="model",
                code="model_not_deletable",
            )
        raise ModelNotFound(model)
    path = row.path
    session.delete(row)
    audit.record(
        session,
        organization_id=row.organization_id,
        project_id=row.project_id,
        actor=principal,
        action="model.deleted",
        object_id=model,
        details={"checkpoint_id": row.id, "job_id": row.job_id},
    )
    session.commit()
    state.weights.delete(path)
    return ModelDeleted(id=model, deleted=True)


def resolve_for_inference(state: AppState, session: Session, *, principal: Principal, model: str) -> ModelRef:
    """A model name as a client sends it (an alias resolved first) → the base folder and, for ft:
    names, the adapter folder. The ref's name is the model's own, which answers echo."""
    model = resolve_model_name(state.settings, session, principal=principal, model=model)
    org = principal.organization_id
    if is_base_model(state.settings, model, session=session, organization_id=org):
        base = resolve_base_model(state.settings, model, session=session, organization_id=org)
        return ModelRef(name=model, base_path=base.path)
    row = usable_checkpoint(session, principal, model)
    if row is None:
        raise ModelNotFound(model)
    base = resolve_base_model(state.settings, row.base_model, session=session)
    return ModelRef(name=model, base_path=base.path, adapter_path=state.weights.path(row.path))
