"""Run and validate a grader (OpenAI's alpha grader endpoints), and the ModelSampler through which
model graders reach this server's inference engine.

Model names resolve as chat's do (base models, and the ft: models and checkpoints the caller may
use) before anything runs, so an unknown model is a 404 naming the grader's `model` field rather
than an error inside the result. Each grader model call is metered as a chat request is."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from tunehouse.api.graders.protocol import RunGraderResponse, ValidateGraderResponse
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.state import AppState
from tunehouse.errors import ModelNotFound
from tunehouse.evals.generation import EngineSampler, Generator
from tunehouse.graders import Grader, Sample, grade_many, parse_grader
from tunehouse.inference.engine import ModelRef
from tunehouse.tenancy.auth import Principal
from tunehouse.usage import metering

log = logging.getLogger(__name__)

# What OpenAI reports per model in model_grader_token_usage_per_model.
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


def _sampler(state: AppState, principal: Principal, models: dict[str, ModelRef]) -> EngineSampler:
    """Model graders sample on the server's engine, the models resolved up front; each call is
    metered as a chat request is."""

    def resolve(name: str) -> ModelRef:
        if name not in models:
            raise ModelNotFound(name)
        return models[name]

    def meter(model: str, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            metering.record_inference(
                state,
                principal,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        except Exception:  # metering must never turn a grade into an error
            log.exception("could not record grader usage for %s", model)

    return EngineSampler(Generator(state.settings, engine=state.inference), resolve, on_usage=meter)


def _resolve_models(
    state: AppState, session: Session, principal: Principal, grader: Grader
) -> dict[str, ModelRef]:
    models = {}
    for name, param in grader.models().items():
        try:
            models[name] = resolve_for_inference(state, session, principal=principal, model=name)
        except ModelNotFound:
            raise ModelNotFound(name, param=param) from None
    return models


def _parse(spec: dict) -> Grader:
    # The plain grader objects (no pass_threshold); label_model only inside a multi grader.
    return parse_grader(spec, param="grader", allow_label_model=False, allow_pass_threshold=False)


def run_grader(
    state: AppState,
    session: Session,
    *,
    principal: Principal,
    grader: dict,
    model_sample: str,
    item: dict | None,
) -> RunGraderResponse:
    parsed = _parse(grader)
    models = _resolve_models(state, session, principal, parsed)
    sampler = _sampler(state, principal, models) if models else None  # no engine for plain graders
    [result] = grade_many(parsed, [(Sample.from_text(model_sample), item or {})], sampler=sampler)
    return RunGraderResponse(
        reward=result.reward,
        metadata=result.metadata(parsed),
        sub_rewards=dict(result.sub_rewards),
        model_grader_token_usage_per_model={
            model: {k: usage[k] for k in USAGE_FIELDS} for model, usage in result.model_usage.items()
        },
    )


def validate_grader(
    state: AppState, session: Session, *, principal: Principal, grader: dict
) -> ValidateGraderResponse:
    parsed = _parse(grader)
    _resolve_models(state, session, principal, parsed)
    return ValidateGraderResponse(grader=parsed.spec)
