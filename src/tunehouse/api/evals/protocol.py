"""Wire types of /v1/evals, named and ordered as in OpenAI's spec (Eval, EvalRun,
EvalRunOutputItem and their lists). The nested objects a request carries (data_source_config,
testing_criteria, a run's data_source) are checked by tunehouse.evals, which names the exact
`param` of every problem; here they are plain JSON."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator

MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
Metadata = dict[MetadataKey, MetadataValue]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _metadata_size(v: Metadata | None) -> Metadata | None:
    if v is not None and len(v) > 16:
        raise ValueError("metadata may hold at most 16 key-value pairs")
    return v


# --- requests --------------------------------------------------------------------------------------


class CreateEvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    metadata: Metadata | None = None
    data_source_config: Any
    testing_criteria: Any

    _metadata = field_validator("metadata")(_metadata_size)


class UpdateEvalRequest(BaseModel):
    """Only the name and metadata of an eval change (as with OpenAI)."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    metadata: Metadata | None = None

    _metadata = field_validator("metadata")(_metadata_size)


class CreateEvalRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    metadata: Metadata | None = None
    data_source: Any

    _metadata = field_validator("metadata")(_metadata_size)


# --- objects ---------------------------------------------------------------------------------------


class Eval(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    created_at: int
    metadata: dict[str, str] | None


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Eval]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool
    eval_id: str


class EvalApiError(BaseModel):
    code: str
    message: str


class ResultCounts(BaseModel):
    total: int
    errored: int
    failed: int
    passed: int


class PerModelUsage(BaseModel):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class PerTestingCriteriaResult(BaseModel):
    testing_criteria: str
    passed: int
    failed: int


class EvalRun(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    status: Literal["queued", "in_progress", "completed", "failed", "canceled"]
    model: str
    name: str
    created_at: int
    report_url: str
    result_counts: ResultCounts
    per_model_usage: list[PerModelUsage] | None
    per_testing_criteria_results: list[PerTestingCriteriaResult] | None
    data_source: dict[str, Any]
    metadata: dict[str, str] | None
    error: EvalApiError | None


class EvalRunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalRun]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EvalRunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool
    run_id: str


class EvalRunOutputItem(BaseModel):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    run_id: str
    eval_id: str
    created_at: int
    status: Literal["pass", "fail", "error"]
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]  # EvalRunOutputItemResult: name, type, score, passed, sample, ...
    sample: dict[str, Any] | None


class EvalRunOutputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalRunOutputItem]
    first_id: str | None
    last_id: str | None
    has_more: bool
