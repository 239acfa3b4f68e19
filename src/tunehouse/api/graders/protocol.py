"""Wire types of /v1/fine_tuning/alpha/graders/{run,validate}, field for field as OpenAI's
(RunGraderRequest, RunGraderResponse, ValidateGraderRequest, ValidateGraderResponse). The grader
object itself is checked by tunehouse.graders.parse_grader, which names the wrong field's path."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RunGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    model_sample: str
    item: dict[str, Any] | None = None


class ValidateGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]


class GraderErrors(BaseModel):
    formula_parse_error: bool
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool
    invalid_variable_error: bool
    other_error: bool
    python_grader_server_error: bool
    python_grader_server_error_type: str | None
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None
    model_grader_server_error: bool
    model_grader_refusal_error: bool
    model_grader_parse_error: bool
    model_grader_server_error_details: str | None


class RunGraderMetadata(BaseModel):
    name: str
    type: str
    errors: GraderErrors
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None


class RunGraderResponse(BaseModel):
    reward: float
    metadata: RunGraderMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


class ValidateGraderResponse(BaseModel):
    grader: dict[str, Any]
