"""The metadata store. Every row a user owns carries its organization; every listed table has an
integer `seq` that gives a stable order for cursor pagination (`after=<id>`)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    slug: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Project(Base):
    """A unit of isolation inside an organization: project keys see only their project's objects."""

    __tablename__ = "projects"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | archived
    # The project objects made by organization admin keys go to; it cannot be archived or deleted.
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    archived_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("organization_id", "name", name="uq_projects_org_name"),)


class ApiKey(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    # sha256 of the key: a leaked database does not leak usable keys.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)
    # None: an organization admin key; otherwise the only project the key can see.
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default="owner")  # owner | member | reader
    last_used_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    path: Mapped[str] = mapped_column(Text)  # relative to the files folder
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)


class Upload(Base):
    """A file sent in parts (OpenAI's /v1/uploads). Completing it assembles the listed parts into
    a File (`file_id`); its parts' rows and bytes go when it is completed, cancelled or expires."""

    __tablename__ = "uploads"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)  # as declared at creation
    mime_type: Mapped[str] = mapped_column(String(256))
    # pending | completed | cancelled | expired (a pending upload past expires_at reads as expired
    # before the sweeper has written it so).
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    # expires_after.seconds of the request: the File made on completion expires that long after it is made.
    file_expires_after: Mapped[int | None] = mapped_column(BigInteger)
    file_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_uploads_status_expires_at", "status", "expires_at"),)


class UploadPart(Base):
    """A part of an upload: its bytes are in the files store under `path`."""

    __tablename__ = "upload_parts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # relative to the files folder
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "fine_tuning_jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    # What the job does, and so which code runs its phases (jobs/kinds.py): "fine_tuning" today;
    # every kind shares the queue, leases, retries and crash resume of this table.
    kind: Mapped[str] = mapped_column(String(32), default="fine_tuning", server_default="fine_tuning")
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))  # as requested and echoed (a base or an ft: model)
    base_model: Mapped[str] = mapped_column(String(256))  # the base the weights start from
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[dict[str, Any]] = mapped_column(
        JSON
    )  # {"type": ..., "<type>": {"hyperparameters": {...}}}
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    # tunehouse extensions that are not hyperparameters, e.g. {"overlap_is_error": true}
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    # Queue bookkeeping: the worker holding the job and until when its lease runs.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A job handed back after its process failed is not claimed again before this time (backoff).
    retry_at: Mapped[float | None] = mapped_column(Float)
    # What a worker needs to run the job (set when its files are validated): only a worker that
    # offers at least this many GPUs claims it.
    gpus_required: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Billing (tunehouse extension, usage/): the training price quoted at creation (USD per 1M
    # billable tokens), the estimate from the data check, and what was billed after the free allowance.
    training_price: Mapped[float | None] = mapped_column(Float)
    estimated_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_cost: Mapped[float | None] = mapped_column(Float)
    cost: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_jobs_queue", "status", "seq"),)


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def _project_of_job(context) -> str | None:
    """A checkpoint belongs to its job's project, whoever registers it (the worker need not know)."""
    job_id = context.get_current_parameters().get("job_id")
    return context.connection.scalar(select(Job.project_id).where(Job.id == job_id))


class Checkpoint(Base):
    """A servable snapshot of a job: one per epoch; the final one *is* the fine-tuned model."""

    __tablename__ = "fine_tuning_checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    model_name: Mapped[str] = mapped_column(String(512), unique=True)
    base_model: Mapped[str] = mapped_column(String(256))
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(Text)  # adapter folder, relative to the weights folder
    is_final: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    project_id: Mapped[str | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True, default=_project_of_job
    )


class CheckpointPermission(Base):
    """A fine-tuned model or checkpoint shared with a project (OpenAI's checkpoint permissions)."""

    __tablename__ = "checkpoint_permissions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    # The organization that owns the checkpoint (and manages the permission).
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    checkpoint_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_checkpoints.id", ondelete="CASCADE"), index=True
    )
    # The project granted access; it may belong to another organization.
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (
        UniqueConstraint("checkpoint_id", "project_id", name="uq_checkpoint_permissions_ckpt_project"),
    )


class ModelAlias(Base):
    """Another name for a model, in one organization (`tunehouse aliases`, the admin API): an old
    OpenAI name (`ft:gpt-4o-mini-…`) that reaches its replacement. The target is a model name (a
    base or fine-tuned model, or a checkpoint) or a fine-tuning job id, which stands for the job's
    fine-tuned model once it has succeeded (api/models/aliases.py resolves it)."""

    __tablename__ = "model_aliases"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(256))
    target: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (UniqueConstraint("organization_id", "name", name="uq_model_aliases_org_name"),)


class MigrationImport(Base):
    """What `tunehouse migrate` created for an object of another platform (an OpenAI file, job,
    eval or model name), so that running it again creates nothing twice."""

    __tablename__ = "migration_imports"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(32))  # "openai"
    kind: Mapped[str] = mapped_column(String(32))  # file | job | eval | alias
    source_id: Mapped[str] = mapped_column(String(512))  # the id (or model name) over there
    local_id: Mapped[str] = mapped_column(String(512))  # what it became here
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (
        UniqueConstraint("organization_id", "source", "kind", "source_id", name="uq_migration_imports_key"),
    )


class AuditLog(Base):
    """Key, project and deletion actions, written in the same transaction as the action.

    No foreign key to the organization on purpose: the record of an organization's deletion
    outlives the organization."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    project_id: Mapped[str | None] = mapped_column(String(64))
    # The key that acted; None for the TUNEHOUSE_ADMIN_KEY and the command line (see actor_type).
    actor_key_id: Mapped[str | None] = mapped_column(String(64))
    actor_type: Mapped[str] = mapped_column(String(16))  # api_key | admin_key | cli
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_id: Mapped[str | None] = mapped_column(String(512))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


# --- usage, quotas and webhooks (usage/, webhooks/) --------------------------------------------------


class UsageRecord(Base):
    """Tokens and cost per organization, project, key, model, UTC day and kind, incremented in place.

    project_id and key_id are "" rather than NULL when absent: a unique index treats NULLs as
    distinct, and the upsert needs the bucket's row to conflict with itself."""

    __tablename__ = "usage_records"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(String(64), default="")
    key_id: Mapped[str] = mapped_column(String(64), default="")
    day: Mapped[dt.date] = mapped_column(Date)
    kind: Mapped[str] = mapped_column(String(16))  # training | inference
    model: Mapped[str] = mapped_column(String(512))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    training_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)  # inference requests, or succeeded jobs
    cost: Mapped[float] = mapped_column(Float, default=0.0)  # USD, after the free training allowance

    __table_args__ = (
        UniqueConstraint(
            "organization_id", "project_id", "key_id", "model", "day", "kind", name="uq_usage_records_bucket"
        ),
        Index("ix_usage_records_org_day", "organization_id", "day"),
    )


class OrganizationQuota(Base):
    """Per-organization overrides of the settings' defaults; NULL inherits, -1 means unlimited."""

    __tablename__ = "organization_quotas"
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    free_training_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_training_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKeyRateLimit(Base):
    """Per-key rate limits, over the organization's. No foreign key to api_keys: that table's
    shape belongs to the keys work; a row left by a deleted key limits nothing."""

    __tablename__ = "api_key_rate_limits"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))  # whsec_…: needed in clear to sign
    events: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """The outbox: one row per (event, endpoint), written with the job's final status change."""

    __tablename__ = "webhook_deliveries"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    event_id: Mapped[str] = mapped_column(String(64))  # the webhook-id header, the same on every retry
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact body, so every attempt signs the same bytes
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)


class Worker(Base):
    """A `tunehouse worker` (or a server's own worker): what it offers, and whether it is alive."""

    __tablename__ = "workers"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(128), unique=True)  # host:pid:random, as in Job.worker_id
    host: Mapped[str] = mapped_column(String(256))
    # {"cpus": 16, "gpus": 2, "gpu_names": [...], "executor": "local" | "ray", "memory_gb": 64.0}
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_heartbeat: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[int | None] = mapped_column(BigInteger)  # set on a graceful stop


# --- evals (evals/, api/evals/) ----------------------------------------------------------------------


class Eval(Base):
    """An eval (OpenAI's /v1/evals): the shape of its data and the criteria its runs are graded by."""

    __tablename__ = "evals"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    # As echoed: {"type": "custom", "schema": {...item and sample...}} (+ include_sample_schema).
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    testing_criteria: Mapped[list[Any]] = mapped_column(JSON)  # grader objects, each with its `id`
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # Milliseconds (not on the wire; it orders the list by last update, and two updates a second
    # apart would tie in seconds).
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now_ms)


class EvalRun(Base):
    """A run of an eval. It executes as a job (the jobs table, kind "eval_run", the same id): its
    status, error and worker bookkeeping live on that job's row."""

    __tablename__ = "eval_runs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(512))  # "" for a jsonl run (nothing is generated)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # Written when the run ends, from its output items; computed from them while it runs.
    result_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    per_model_usage: Mapped[list[Any] | None] = mapped_column(JSON)
    per_testing_criteria_results: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class EvalOutputItem(Base):
    """One graded item of a run. (run_id, datasource_item_id) is unique: a run resumed after its
    process died writes only the items it had not written, never one twice."""

    __tablename__ = "eval_output_items"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    eval_id: Mapped[str] = mapped_column(String(64))
    datasource_item_id: Mapped[int] = mapped_column(Integer)
    datasource_item: Mapped[dict[str, Any]] = mapped_column(JSON)
    results: Mapped[list[Any]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pass | fail | error
    # Tokens this item cost, per model (the run's model, and the models of model graders).
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (UniqueConstraint("run_id", "datasource_item_id", name="uq_eval_output_items_run_item"),)


class Batch(Base):
    """A batch (/v1/batches): its input file's requests run on the job workers as a job of kind
    "batch" with the batch's id. The wire status is the batch's own (OpenAI's vocabulary); the job
    row carries only the queue's bookkeeping (lease, attempts)."""

    __tablename__ = "batches"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str | None] = mapped_column(String(64))  # who created it: its usage is metered to it
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(512))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    errors: Mapped[list[Any] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger)  # seconds after the files' creation
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    # The validated requests, one JSON line each, in the files store (jobs/batch.py reads them).
    plan_path: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)


class BatchOutput(Base):
    """One request's outcome (a line of the output or the error file). (batch_id, line) is unique:
    a batch resumed after its process died writes only the lines it had not written, and each
    line's usage is metered in the transaction that writes it, so never twice."""

    __tablename__ = "batch_outputs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # batch_req_…
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)  # the input file's line number (1-based)
    custom_id: Mapped[str] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(Boolean)  # status 200: the output file; else the error file
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (UniqueConstraint("batch_id", "line", name="uq_batch_outputs_batch_line"),)


class StoredCompletion(Base):
    """A chat completion made with `store: true` (OpenAI's stored chat completions): the answer as
    it was sent, the request's messages, and its metadata (which may be updated)."""

    __tablename__ = "stored_completions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # chatcmpl-…
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    messages: Mapped[list[Any]] = mapped_column(JSON)  # the request's messages, as sent
    response: Mapped[dict[str, Any]] = mapped_column(JSON)  # the chat.completion, as sent


class StoredResponse(Base):
    """A response of /v1/responses (`store`, default true; every `background` one): the Response
    object as last known (its status moves while a background response runs), and the input items
    it was generated from (the conversation before it, from `previous_response_id`, then the
    request's own input), each with its id, as `input_items` lists them."""

    __tablename__ = "stored_responses"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # resp_…
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    input_items: Mapped[list[Any]] = mapped_column(JSON)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)  # the Response object, as answered
    # A background response's lease: the server process generating it renews it; a reader that finds
    # it lapsed while the response is still in progress knows that process is gone and fails it.
    lease_until: Mapped[float | None] = mapped_column(Float)


class RegisteredBaseModel(Base):
    """A base model added with `tunehouse models add` or the admin API (store/registry.py): its
    weights copied under the server's home, what was read from its config when it was added, and
    the organizations that may use it (None: every organization)."""

    __tablename__ = "base_models"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # bm_…
    name: Mapped[str] = mapped_column(String(256), unique=True)
    path: Mapped[str] = mapped_column(Text)  # the copied Hugging Face folder
    source: Mapped[str] = mapped_column(Text)  # the folder or GGUF file it was added from
    architecture: Mapped[str] = mapped_column(String(128))  # e.g. Qwen2ForCausalLM
    model_type: Mapped[str] = mapped_column(String(64))  # e.g. qwen2
    context_length: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(16))  # of the stored weights
    memory: Mapped[dict[str, Any]] = mapped_column(JSON)  # bytes: serve, train_lora, train_full
    organizations: Mapped[list[Any] | None] = mapped_column(JSON)  # organization ids; None: all
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
