"""Wire types of /v1/fine_tuning, ordered and named as in OpenAI's spec (FineTuningJob & co.)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Auto = Literal["auto"]
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
# A module name as PEFT matches it: the end of a dotted module path ("q_proj", "mlp.down_proj").
ModuleName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", max_length=128)
]


class Hyperparameters(BaseModel):
    """Each is "auto" (resolved by documented rules, see training/hparams.py) or a number."""

    model_config = ConfigDict(extra="forbid")
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    # tunehouse extensions (echoed on the job like the others): which weights train, "lora" (an
    # adapter) or "full" (every weight); "auto" is lora, or the type of the ft: model a job
    # continues. Then the LoRA adapter's shape (lora only): rank, alpha, and the module names
    # it wraps (default: every attention and MLP projection).
    fine_tuning_type: Literal["auto", "lora", "full"] = "auto"
    lora_rank: Annotated[int, Field(ge=1, le=256)] = 16
    lora_alpha: Annotated[int, Field(ge=1, le=1024)] = 32
    lora_target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's FineTuneReinforcementHyperparameters; what each maps to here is in
    training/hparams.py (`resolve_reinforcement_hyperparameters`) and the README."""

    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    compute_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"
    eval_interval: Auto | Annotated[int, Field(ge=1)] = "auto"
    eval_samples: Auto | Annotated[int, Field(ge=1)] = "auto"
    # tunehouse extension: weight of the KL penalty to the base model (0: none, TRL's default).
    kl_beta: Annotated[float, Field(ge=0, le=10)] = 0.0
    # tunehouse extension: the most tokens an answer may have (default: from reasoning_effort).
    max_completion_tokens: Annotated[int, Field(ge=1, le=32768)] | None = None


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)
    # OpenAI's RFT option (not in its published schema): the answers sampled during training (and
    # validation) follow this format, as chat's `response_format` (json_object / json_schema).
    response_format: dict[str, Any] | None = None


# Each method's hyperparameters object, by `method.type`.
METHOD_HYPERPARAMETERS: dict[str, type[Hyperparameters]] = {
    "supervised": Hyperparameters,
    "dpo": DpoHyperparameters,
    "reinforcement": ReinforcementHyperparameters,
}


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class Evaluation(BaseModel):
    """tunehouse extension: how the job judges its checkpoints (jobs/evaluation.py). A grader, or
    an eval's testing criteria, scores each checkpoint and the starting model on the validation
    file; `select_checkpoint: "best"` makes the job's model the best-scoring checkpoint."""

    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] | None = None
    eval_id: str | None = None
    select_checkpoint: Literal["last", "best"] = "last"
    # The forgetting and safety checks; null: the server's TUNEHOUSE_GENERAL_CHECKS.
    general_checks: bool | None = None


class CreateFineTuningJobRequest(BaseModel):
    """OpenAI's fields and two tunehouse extensions (`overlap_is_error`, `evaluation`); any other
    field, here or in `method`, is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None  # deprecated top-level form, still sent by old clients
    suffix: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    validation_file: str | None = None
    integrations: list[dict[str, Any]] | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    method: Method | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = None
    # tunehouse extension: train/validation overlap (contamination) fails the job instead of warning.
    overlap_is_error: bool = False
    evaluation: Evaluation | None = None  # tunehouse extension

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v):
        if v is not None and len(v) > 16:
            raise ValueError("metadata may hold at most 16 key-value pairs")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any] | None
    model: str
    organization_id: str
    result_files: list[str]
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    integrations: list[dict[str, Any]] | None = None
    seed: int
    estimated_finish: int | None = None
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None  # not in the schema; OpenAI sends it, so do we
    # tunehouse extensions (README "Usage, cost and quotas"), USD: the estimate from the data
    # check (billable tokens × the training price quoted at creation; null until estimated), and
    # the cost billed once the job succeeded, after the organization's free daily allowance.
    estimated_tokens: int | None = None
    estimated_cost: float | None = None
    cost: float | None = None
    # tunehouse extension (jobs/evaluation.py): the validation scores of the starting model and the
    # checkpoints, which checkpoint became the model and why, the forgetting and safety checks.
    evaluation: dict[str, Any] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DataCheckRequest(BaseModel):
    """tunehouse extension: check files before creating a job (POST /v1/fine_tuning/data_checks)."""

    model_config = ConfigDict(extra="forbid")
    training_file: str
    validation_file: str | None = None
    model: str | None = None  # base model whose tokenizer and context are used; default: the embedded one
    method: Literal["supervised", "dpo"] = "supervised"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    overlap_is_error: bool = False
