"""Model aliases: another name for a model in one organization, e.g. an old OpenAI name
(`ft:gpt-4o-mini-2024-07-18:acme::AbC123`) that reaches its replacement here.

`resolve_model_name` is the one place an alias becomes a model name: every service that takes a
model name (chat, completions, batches, graders, eval runs through `models.service.
resolve_for_inference`; fine-tuning jobs and eval definitions directly) calls it before looking the
model up, so nothing below the API layer ever sees an alias (workers read the resolved name).

Rules:
- A real model name always wins: an alias may not be created with a base or fine-tuned model's
  name, and if such a model appears later, the name reaches the model, not the alias.
- The target is a model the organization may use (a base model, one of its fine-tuned models or
  checkpoints, one shared with it) or one of its fine-tuning jobs (`ftjob-…`): the alias then
  stands for that job's fine-tuned model, and answers 404 model_not_found, saying why, until the
  job has succeeded. A target deleted later makes the alias answer 404 model_not_found, naming it.
- No chains: a target may not itself be an alias.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.api.aliases.protocol import ModelAlias as WireAlias
from tunehouse.api.aliases.protocol import ModelAliasDeleted, ModelAliasList
from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.jobs.fine_tuning import FineTuning
from tunehouse.store import job_status as st
from tunehouse.store.catalog import is_base_model
from tunehouse.store.tables import Checkpoint, Job, ModelAlias
from tunehouse.tenancy import audit
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import usable_checkpoint

JOB_PREFIX = "ftjob-"
MODEL_GRADERS = ("score_model", "label_model")


@dataclass(frozen=True)
class Resolution:
    status: str  # ready | pending | missing
    model: str | None  # the model the alias answers with now (ready only)
    message: str | None  # why it does not answer (pending, missing)


def find_alias(session: Session, organization_id: str, name: str) -> ModelAlias | None:
    return session.scalar(
        select(ModelAlias).where(ModelAlias.organization_id == organization_id, ModelAlias.name == name)
    )


def _is_base(settings: Settings, session: Session, principal: Principal, name: str) -> bool:
    return is_base_model(settings, name, session=session, organization_id=principal.organization_id)


def _is_model(settings: Settings, session: Session, principal: Principal, name: str) -> bool:
    return (
        _is_base(settings, session, principal, name)
        or usable_checkpoint(session, principal, name) is not None
    )


def resolution(settings: Settings, session: Session, principal: Principal, row: ModelAlias) -> Resolution:
    """Where an alias leads now, for this caller (a project key reaches only what its project may
    use, and learns nothing of a target outside its project: not its name, not its job)."""
    hidden = Resolution(
        "missing",
        None,
        f"The model `{row.name}` is an alias whose target does not exist or is not available to this project.",
    )
    target = row.target
    if target.startswith(JOB_PREFIX):
        job = session.scalar(select(Job).where(Job.id == target, Job.organization_id == row.organization_id))
        if job is not None and principal.project_id is not None and job.project_id != principal.project_id:
            return hidden
        if job is None:
            return Resolution(
                "missing",
                None,
                f"The model `{row.name}` is an alias of fine-tuning job {target}, which no longer exists.",
            )
        if job.status != st.SUCCEEDED or not job.fine_tuned_model:
            if job.status in st.TERMINAL:
                why = f"which has {job.status} without a model: point the alias at another model"
                return Resolution(
                    "missing", None, f"The model `{row.name}` is an alias of fine-tuning job {target}, {why}."
                )
            return Resolution(
                "pending",
                None,
                f"The model `{row.name}` is an alias of fine-tuning job {target}, which is {job.status}: "
                "it answers once the job has succeeded.",
            )
        target = job.fine_tuned_model
    if _is_model(settings, session, principal, target):
        return Resolution("ready", target, None)
    if principal.project_id is not None:
        return hidden
    return Resolution(
        "missing",
        None,
        f"The model `{row.name}` is an alias of `{target}`, which no longer exists or you do not have access to it.",
    )


def resolve_model_name(
    settings: Settings, session: Session, *, principal: Principal, model: str, param: str | None = "model"
) -> str:
    """The model a name means for this caller: the name itself, or the model its alias leads to.
    An alias that leads nowhere now is a 404 model_not_found that says why."""
    if _is_base(settings, session, principal, model):
        return model
    row = find_alias(session, principal.organization_id, model)
    if row is None or usable_checkpoint(session, principal, model) is not None:
        return model  # not an alias, or a real model of that name (which always wins)
    found = resolution(settings, session, principal, row)
    if found.model is None:
        raise NotFound(found.message or "", param=param, code="model_not_found")
    return found.model


def resolve_grader_models(
    settings: Settings, session: Session, *, principal: Principal, spec: Any, param: str
) -> Any:
    """A grader spec (or a list of them) with the aliases among its model graders' `model`s
    replaced by their models (multi graders included); other names are left for the caller's
    own checks."""

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v, f"{where}.{k}") if isinstance(v, dict | list) else v for k, v in node.items()}
        if out.get("type") in MODEL_GRADERS and isinstance(out.get("model"), str):
            out["model"] = resolve_model_name(
                settings, session, principal=principal, model=out["model"], param=f"{where}.model"
            )
        return out

    return walk(copy.deepcopy(spec), param)


# --- the admin API and CLI ---------------------------------------------------------------------


def to_wire(settings: Settings, session: Session, principal: Principal, row: ModelAlias) -> WireAlias:
    found = resolution(settings, session, principal, row)
    return WireAlias(
        name=row.name,
        target=row.target,
        resolved_model=found.model,
        status=found.status,
        created_at=row.created_at,
    )


def _check_target(settings: Settings, session: Session, principal: Principal, target: str) -> None:
    if target.startswith(JOB_PREFIX):
        job = session.scalar(
            select(Job).where(
                Job.id == target,
                Job.organization_id == principal.organization_id,
                Job.kind == FineTuning.name,
            )
        )
        if job is None:
            raise NotFound(
                f"No fine-tuning job {target} in this organization.",
                param="target",
                code="fine_tuning_job_not_found",
            )
        if job.status in st.TERMINAL and job.status != st.SUCCEEDED:
            raise InvalidRequest(
                f"Fine-tuning job {target} has {job.status}: it will never have a model to answer with.",
                param="target",
            )
        return
    other = find_alias(session, principal.organization_id, target)
    if other is not None and not _is_model(settings, session, principal, target):
        raise InvalidRequest(
            f"`{target}` is itself an alias (of `{other.target}`); point the alias at `{other.target}`.",
            param="target",
            code="alias_chain",
        )
    if not _is_model(settings, session, principal, target):
        raise NotFound(
            f"The model `{target}` does not exist or you do not have access to it.",
            param="target",
            code="model_not_found",
        )


def create_alias(
    settings: Settings, session: Session, *, principal: Principal, name: str, target: str, cli: bool = False
) -> WireAlias:
    if is_base_model(settings, name, session=session) or session.scalar(
        select(Checkpoint.id).where(Checkpoint.model_name == name)
    ):
        raise InvalidRequest(
            f"`{name}` is the name of a model: an alias may not hide it.",
            param="name",
            code="alias_shadows_model",
        )
    if name.startswith(JOB_PREFIX):
        raise InvalidRequest(
            f"An alias may not start with '{JOB_PREFIX}' (that is how a target names a fine-tuning job).",
            param="name",
        )
    if name == target:
        raise InvalidRequest("An alias may not point at itself.", param="target")
    existing = find_alias(session, principal.organization_id, name)
    if existing is not None:
        raise InvalidRequest(
            f"The alias `{name}` already exists (of `{existing.target}`); remove it first to point it elsewhere.",
            param="name",
            code="alias_exists",
        )
    _check_target(settings, session, principal, target)
    row = ModelAlias(organization_id=principal.organization_id, name=name, target=target)
    session.add(row)
    audit.record(
        session,
        organization_id=principal.organization_id,
        actor=None if cli else principal,
        action="model_alias.created",
        object_id=name,
        details={"target": target},
    )
    session.commit()
    return to_wire(settings, session, principal, row)


def list_aliases(settings: Settings, session: Session, *, principal: Principal) -> ModelAliasList:
    rows = session.scalars(
        select(ModelAlias)
        .where(ModelAlias.organization_id == principal.organization_id)
        .order_by(ModelAlias.seq)
    )
    return ModelAliasList(data=[to_wire(settings, session, principal, r) for r in rows])


def _alias_or_404(session: Session, principal: Principal, name: str) -> ModelAlias:
    row = find_alias(session, principal.organization_id, name)
    if row is None:
        raise NotFound(
            f"No model alias `{name}` in this organization.", param="name", code="model_alias_not_found"
        )
    return row


def get_alias(settings: Settings, session: Session, *, principal: Principal, name: str) -> WireAlias:
    row = _alias_or_404(session, principal, name)
    return to_wire(settings, session, principal, row)


def delete_alias(
    session: Session, *, principal: Principal, name: str, cli: bool = False
) -> ModelAliasDeleted:
    row = _alias_or_404(session, principal, name)
    session.delete(row)
    audit.record(
        session,
        organization_id=principal.organization_id,
        actor=None if cli else principal,
        action="model_alias.deleted",
        object_id=name,
        details={"target": row.target},
    )
    session.commit()
    return ModelAliasDeleted(name=name, deleted=True)


def listed_aliases(settings: Settings, session: Session, *, principal: Principal) -> list[ModelAlias]:
    """The aliases /v1/models shows this caller: those that lead somewhere it may use, now or once
    their job has succeeded (an alias of a deleted model is not listed; calling it says why)."""
    rows = session.scalars(
        select(ModelAlias)
        .where(ModelAlias.organization_id == principal.organization_id)
        .order_by(ModelAlias.seq)
    )
    return [r for r in rows if resolution(settings, session, principal, r).status != "missing"]
