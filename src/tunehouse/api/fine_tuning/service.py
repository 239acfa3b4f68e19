"""Fine-tuning jobs as the API sees them: create (validated synchronously where it is cheap),
list, retrieve, cancel, events and checkpoints. The worker does the rest (jobs/)."""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.api.aliases.service import resolve_grader_models, resolve_model_name
from tunehouse.api.files.service import get_file_row
from tunehouse.api.fine_tuning.protocol import (
    METHOD_HYPERPARAMETERS,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    Hyperparameters,
    JobError,
)
from tunehouse.api.pagination import page
from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest, ModelNotFound, NotFound
from tunehouse.graders import parse_grader
from tunehouse.inference.constrained import InvalidResponseFormat, validate_response_format
from tunehouse.jobs.events import add_event
from tunehouse.jobs.fine_tuning import FineTuning
from tunehouse.store import files
from tunehouse.store import job_status as st
from tunehouse.store.blobs import Blobs
from tunehouse.store.catalog import is_base_model
from tunehouse.store.tables import Checkpoint, Eval, Job, JobEvent, now
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import own_checkpoint, scoped, usable_checkpoint
from tunehouse.training.hparams import LORA_TARGET_MODULES
from tunehouse.training.recipes import METHODS
from tunehouse.usage.quotas import admit_job
from tunehouse.webhooks.outbox import JOB_CANCELLED, enqueue_job_event


def to_wire(job: Job) -> FineTuningJob:
    # Only the job's own method object: the schema has no null for the other methods' keys.
    method = {k: v for k, v in job.method.items() if v is not None}
    hyper = (method.get(method["type"]) or {}).get("hyperparameters")
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        # The legacy top-level field mirrors the supervised hyperparameters (null for other methods).
        hyperparameters=hyper if method["type"] == "supervised" else None,
        model=job.model,
        organization_id=job.organization_id,
        result_files=list(job.result_files or []),
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        integrations=job.integrations,
        seed=job.seed,
        # Null unless running, as OpenAI's: a paused, failed or cancelled job keeps no stale time.
        estimated_finish=job.estimated_finish if job.status == "running" else None,
        method=method,
        metadata=job.metadata_,
        user_provided_suffix=job.suffix,
        estimated_tokens=job.estimated_tokens,
        estimated_cost=job.estimated_cost,
        cost=job.cost,
        evaluation=(job.options or {}).get("evaluation_result"),
    )


def _file_on_disk(blobs: Blobs, session: Session, principal: Principal, file_id: str) -> Path:
    return files.file_path(blobs, get_file_row(session, principal=principal, file_id=file_id))


def _check_training_file(session: Session, principal: Principal, file_id: str, param: str) -> None:
    try:
        row = get_file_row(session, principal=principal, file_id=file_id)
    except NotFound:
        raise NotFound(f"No such File object: {file_id}", param=param) from None
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"File {file_id} has purpose '{row.purpose}'; fine-tuning needs a file uploaded with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )


def _resolve_hyperparameters(req: CreateFineTuningJobRequest) -> tuple[str, Hyperparameters, str]:
    """(method type, requested hyperparameters, their place in the request for error `param`s)."""
    method = req.method
    if method is not None and req.hyperparameters is not None:
        raise InvalidRequest(
            "Pass hyperparameters either in 'method' or in the deprecated top-level 'hyperparameters', not both.",
            param="hyperparameters",
        )
    method_type = method.type if method else "supervised"
    if method_type not in METHODS:  # the training methods this server has (training/recipes)
        raise InvalidRequest(
            f"The '{method_type}' method is not available on this server; use "
            f"{' or '.join(repr(m) for m in METHODS)}.",
            param="method.type",
            code="unsupported_method",
        )
    # The method's own object (`method.<type>`), else the deprecated top-level field, else all auto.
    given = getattr(method, method_type, None) if method is not None else None
    hyper = (given.hyperparameters if given is not None else None) or (
        req.hyperparameters if method is None else None
    )
    if hyper is None:
        hyper = METHOD_HYPERPARAMETERS[method_type]()  # every value "auto"
    where = f"method.{method_type}.hyperparameters" if method is not None else "hyperparameters"
    return method_type, hyper, where


LORA_ONLY = ("lora_rank", "lora_alpha", "lora_target_modules")


def _resolve_fine_tuning_type(
    session: Session, hyper: Hyperparameters, *, where: str, init_model: str | None
) -> dict:
    """The requested hyperparameters with the tunehouse extensions resolved: `fine_tuning_type`
    "auto" becomes "lora", or the type of the ft: model the job continues; a full job carries no
    LoRA fields, a LoRA job its target modules (the default list when none were asked for)."""
    init_type = None
    if init_model is not None:
        job_id = session.scalar(select(Checkpoint.job_id).where(Checkpoint.model_name == init_model))
        source = session.scalar(select(Job.method).where(Job.id == job_id)) or {}
        source_hyper = (source.get(source.get("type", "supervised")) or {}).get("hyperparameters") or {}
        init_type = source_hyper.get("fine_tuning_type") or "lora"  # jobs from before full FT: lora
    out = hyper.model_dump()
    ft_type = hyper.fine_tuning_type if hyper.fine_tuning_type != "auto" else (init_type or "lora")
    if ft_type == "lora" and init_type == "full":
        # The adapter would belong to that model's own weights, not to the base every LoRA model
        # of this server is served and exported on top of.
        raise InvalidRequest(
            f"{init_model} was fully fine-tuned; a LoRA adapter cannot be trained on top of it. "
            "Continue it with fine_tuning_type 'full' (or 'auto').",
            param=f"{where}.fine_tuning_type",
            code="unsupported_fine_tuning_type",
        )
    if ft_type == "full":
        for name in LORA_ONLY:
            if name in hyper.model_fields_set:
                raise InvalidRequest(
                    f"'{name}' shapes a LoRA adapter; it cannot be used with fine_tuning_type 'full'.",
                    param=f"{where}.{name}",
                )
            out.pop(name, None)
    elif out.get("lora_target_modules") is None:
        out["lora_target_modules"] = list(LORA_TARGET_MODULES)
    out["fine_tuning_type"] = ft_type
    return out


def _resolve_start(
    settings: Settings, session: Session, principal: Principal, model: str
) -> tuple[str, dict]:
    """(base model, options) for a job starting from `model`: a base, or one of the
    organization's fine-tuned models or checkpoints, whose adapter training then continues."""
    if is_base_model(settings, model, session=session, organization_id=principal.organization_id):
        return model, {}
    if model.startswith("ft:"):
        row = own_checkpoint(session, principal, model)
        if row is not None:
            return row.base_model, {"init_model": model}
    raise ModelNotFound(model)


def _evaluation_options(
    settings: Settings, session: Session, principal: Principal, req: CreateFineTuningJobRequest
) -> dict:
    """The job's `evaluation` as the worker reads it: the graders themselves (an eval's criteria
    are copied, so the job keeps them if the eval changes or goes), checked now, not mid-job."""
    ev = req.evaluation
    if ev.grader is not None and ev.eval_id is not None:
        raise InvalidRequest("Give evaluation.grader or evaluation.eval_id, not both.", param="evaluation")
    graders = []
    if ev.grader is not None:
        graders = [parse_grader(ev.grader, param="evaluation.grader")]
    elif ev.eval_id is not None:
        row = session.scalar(scoped(Eval, principal).where(Eval.id == ev.eval_id))
        if row is None:
            raise NotFound(f"No eval found with id '{ev.eval_id}'.", param="evaluation.eval_id")
        # Stored criteria carry the id the eval gave them; the grader itself is the rest.
        graders = [
            parse_grader({k: v for k, v in c.items() if k != "id"}, param="evaluation.eval_id")
            for c in row.testing_criteria
        ]
    org = principal.organization_id
    for grader in graders:
        for model, param in grader.models().items():
            usable_base = is_base_model(settings, model, session=session, organization_id=org)
            if not usable_base and usable_checkpoint(session, principal, model) is None:
                raise ModelNotFound(model, param=param)
    specs = [grader.spec for grader in graders]
    if specs and not req.validation_file:
        raise InvalidRequest(
            "The grader scores the checkpoints on the validation file: give a validation_file.",
            param="validation_file",
        )
    if ev.select_checkpoint == "best" and not specs:
        raise InvalidRequest(
            'select_checkpoint "best" needs a grader or an eval_id to score the checkpoints by.',
            param="evaluation.select_checkpoint",
        )
    return {"graders": specs, "select_checkpoint": ev.select_checkpoint, "general_checks": ev.general_checks}


def _reinforcement_grader(
    settings: Settings, session: Session, principal: Principal, req: CreateFineTuningJobRequest
) -> dict:
    """`method.reinforcement.grader` (and `response_format`), checked now (its type, fields,
    templates, python source, the models it names), not when training starts."""
    if req.method.reinforcement is None:
        raise InvalidRequest(
            "A reinforcement job needs method.reinforcement with the grader that scores its answers.",
            param="method.reinforcement",
        )
    hyper = req.method.reinforcement.hyperparameters
    if hyper.kl_beta and hyper.fine_tuning_type == "full":
        # The KL term's reference is the base with the adapter switched off: a LoRA job's.
        raise InvalidRequest(
            "kl_beta needs a LoRA job (fine_tuning_type 'lora' or 'auto'): the KL penalty is taken "
            "against the base model with the adapter switched off.",
            param="method.reinforcement.hyperparameters.kl_beta",
        )
    response_format = req.method.reinforcement.response_format
    if response_format is not None:
        try:
            validate_response_format(response_format)
        except InvalidResponseFormat as e:
            raise InvalidRequest(str(e), param="method.reinforcement.response_format") from None
    param = "method.reinforcement.grader"
    # OpenAI's FineTuneReinforcementMethod takes these grader types (a label_model only inside a
    # multi grader) and no pass_threshold.
    grader = parse_grader(
        req.method.reinforcement.grader, param=param, allow_label_model=False, allow_pass_threshold=False
    )
    org = principal.organization_id
    for model, where in grader.models().items():
        usable_base = is_base_model(settings, model, session=session, organization_id=org)
        if not usable_base and usable_checkpoint(session, principal, model) is None:
            raise ModelNotFound(model, param=where)
    if response_format is None:
        return {"grader": grader.spec}
    return {"grader": grader.spec, "response_format": response_format}


def _resolve_aliases(
    settings: Settings, session: Session, principal: Principal, req: CreateFineTuningJobRequest
) -> CreateFineTuningJobRequest:
    """The request with model aliases (api/aliases) replaced by their models: the job starts from,
    records and grades with the models themselves, as OpenAI's job names the snapshot an alias like
    `gpt-4o-mini` meant."""
    model = resolve_model_name(settings, session, principal=principal, model=req.model)
    update: dict = {"model": model}
    if req.evaluation is not None and req.evaluation.grader is not None:
        grader = resolve_grader_models(
            settings, session, principal=principal, spec=req.evaluation.grader, param="evaluation.grader"
        )
        update["evaluation"] = req.evaluation.model_copy(update={"grader": grader})
    if req.method is not None and req.method.reinforcement is not None:
        rl = req.method.reinforcement
        grader = resolve_grader_models(
            settings, session, principal=principal, spec=rl.grader, param="method.reinforcement.grader"
        )
        update["method"] = req.method.model_copy(
            update={"reinforcement": rl.model_copy(update={"grader": grader})}
        )
    return req.model_copy(update=update)


def create_job(
    settings: Settings,
    session: Session,
    *,
    files_store: Blobs,
    principal: Principal,
    req: CreateFineTuningJobRequest,
    job_id: str | None = None,
) -> FineTuningJob:
    """`job_id`: an id chosen by the caller (`tunehouse migrate` records it in the same commit)."""
    req = _resolve_aliases(settings, session, principal, req)
    method_type, requested, where = _resolve_hyperparameters(req)
    base_model, options = _resolve_start(settings, session, principal, req.model)
    # DPO from an ft: model starts from it and uses it as the reference (training/recipes/dpo.py).
    hyper = _resolve_fine_tuning_type(session, requested, where=where, init_model=options.get("init_model"))

    _check_training_file(session, principal, req.training_file, "training_file")
    if req.validation_file:
        _check_training_file(session, principal, req.validation_file, "validation_file")
    if req.integrations:
        raise InvalidRequest(
            "Integrations (e.g. wandb) are not supported: tunehouse does not send job data to third parties.",
            param="integrations",
        )
    if req.overlap_is_error:
        options["overlap_is_error"] = True
    if req.evaluation is not None:
        options["evaluation"] = _evaluation_options(settings, session, principal, req)
    extra = _reinforcement_grader(settings, session, principal, req) if method_type == "reinforcement" else {}
    # Quotas before anything is written: a refused job leaves no row and no event.
    billing = admit_job(
        settings,
        session,
        organization_id=principal.organization_id,
        base_model=base_model,
        train_path=lambda: _file_on_disk(files_store, session, principal, req.training_file),
        method=method_type,
        n_epochs=hyper.get("n_epochs", "auto"),
    )

    job = Job(
        id=job_id or ids.job_id(),
        organization_id=principal.organization_id,
        project_id=principal.owning_project_id,
        model=req.model,
        base_model=base_model,
        training_file=req.training_file,
        validation_file=req.validation_file,
        suffix=req.suffix,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
        method={"type": method_type, method_type: {**extra, "hyperparameters": hyper}},
        metadata_=req.metadata,
        integrations=None,
        options=options or None,
        status=st.VALIDATING,
        result_files=[],
        **billing,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    if job.validation_file:
        add_event(
            session,
            job.id,
            f"Validating training file: {job.training_file} and validation file: {job.validation_file}",
        )
    else:
        add_event(session, job.id, f"Validating training file: {job.training_file}")
    session.commit()
    return to_wire(job)


def fine_tuning_jobs(principal: Principal):
    """The caller's fine-tuning jobs: the jobs table also holds other kinds of job (jobs/kinds.py),
    which these endpoints never show."""
    return scoped(Job, principal).where(Job.kind == FineTuning.name)


def get_job_row(session: Session, *, principal: Principal, job_id: str) -> Job:
    job = session.scalar(fine_tuning_jobs(principal).where(Job.id == job_id))
    if job is None:
        raise NotFound(
            f"Could not find fine-tuning job: {job_id}",
            param="fine_tuning_job_id",
            code="fine_tuning_job_not_found",
        )
    return job


def list_jobs(
    session: Session, *, principal: Principal, after: str | None, limit: int, metadata: dict[str, str] | None
) -> FineTuningJobList:
    stmt = fine_tuning_jobs(principal)
    if not metadata:
        rows, has_more = page(session, stmt, Job, after=after, limit=limit)
    else:
        # JSON filtering differs between SQLite and PostgreSQL; filter here over the cursor's window.
        rows, has_more = [], False
        candidates, _ = page(session, stmt, Job, after=after, limit=10**9)
        for job in candidates:
            if all((job.metadata_ or {}).get(k) == v for k, v in metadata.items()):
                if len(rows) == limit:
                    has_more = True
                    break
                rows.append(job)
    return FineTuningJobList(data=[to_wire(j) for j in rows], has_more=has_more)


def cancel_job(session: Session, *, principal: Principal, job_id: str) -> FineTuningJob:
    job = get_job_row(session, principal=principal, job_id=job_id)
    if job.status in st.TERMINAL:
        raise InvalidRequest(
            f"Job {job_id} has already {'been ' if job.status == st.CANCELLED else ''}"
            f"{job.status} and cannot be cancelled.",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    # The worker notices within a poll and stops the training process.
    job.status = st.CANCELLED
    job.finished_at = now()
    add_event(session, job.id, "Fine-tuning job cancelled")
    enqueue_job_event(session, job_id=job.id, event_type=JOB_CANCELLED, organization_id=job.organization_id)
    session.commit()
    return to_wire(job)


def pause_job(session: Session, *, principal: Principal, job_id: str) -> FineTuningJob:
    job = get_job_row(session, principal=principal, job_id=job_id)
    if job.status not in (st.QUEUED, st.RUNNING):
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a queued or running job can be paused.",
            param="fine_tuning_job_id",
            code="job_not_pausable",
        )
    # The worker notices, and the training process saves its full state before it stops.
    job.status = st.PAUSED
    add_event(session, job.id, "Fine-tuning job paused")
    session.commit()
    return to_wire(job)


def resume_job(session: Session, *, principal: Principal, job_id: str) -> FineTuningJob:
    job = get_job_row(session, principal=principal, job_id=job_id)
    if job.status != st.PAUSED:
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a paused job can be resumed.",
            param="fine_tuning_job_id",
            code="job_not_resumable",
        )
    job.status = st.QUEUED
    job.worker_id = None
    job.lease_expires_at = None
    add_event(session, job.id, "Fine-tuning job resumed")
    session.commit()
    return to_wire(job)


def list_events(
    session: Session, *, principal: Principal, job_id: str, after: str | None, limit: int
) -> FineTuningJobEventList:
    get_job_row(session, principal=principal, job_id=job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    rows, has_more = page(session, stmt, JobEvent, after=after, limit=limit)
    return FineTuningJobEventList(
        data=[
            FineTuningJobEvent(
                id=e.id, created_at=e.created_at, level=e.level, message=e.message, type=e.type, data=e.data
            )
            for e in rows
        ],
        has_more=has_more,
    )


def list_checkpoints(
    session: Session, *, principal: Principal, job_id: str, after: str | None, limit: int
) -> FineTuningJobCheckpointList:
    get_job_row(session, principal=principal, job_id=job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    rows, has_more = page(session, stmt, Checkpoint, after=after, limit=limit)
    data = [
        FineTuningJobCheckpoint(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=c.model_name,
            fine_tuning_job_id=c.job_id,
            metrics=c.metrics or {},
            step_number=c.step_number,
        )
        for c in rows
    ]
    return FineTuningJobCheckpointList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )
