"""The fine-tuning job kind: its two phases, each run in a process of its own by the runner
(jobs/runner.py) for a worker.

    validate   check the files with the method's data check, resolve "auto" hyperparameters
               through the method's table entry (training/recipes), estimate cost and time, and
               queue the job (or fail it with every problem located)
    train      the method's recipe over the shared loop (training/loop.py), its progress written
               as events, metrics and checkpoints; on success the model is registered with a
               result file; a stop (pause, cancel, a lost lease) saves the training state first

Data parallel: with several Ray Train workers (executors/ray.py) every rank runs `train`; they
join one process group and the loop shares each step between them; rank 0 alone records.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from tunehouse import ids
from tunehouse.data.analysis import check_files, context_length_for
from tunehouse.jobs import queue
from tunehouse.jobs import status as st
from tunehouse.jobs.context import DP_LOCAL_RANK, DP_MASTER, JobContext, JobGone
from tunehouse.jobs.evaluation import evaluate
from tunehouse.jobs.events import add_event, metrics_message
from tunehouse.jobs.reinforcement import missing_references, reinforcement_rewarder, rollout_sampler
from tunehouse.jobs.state_store import StoredState, discard_training_state, stored_state
from tunehouse.store import files
from tunehouse.store.blobs import is_disk_full
from tunehouse.store.catalog import resolve_base_model
from tunehouse.store.tables import Checkpoint, Job, JobEvent, Organization, now
from tunehouse.training import throughput
from tunehouse.training.hparams import Hyperparameters
from tunehouse.training.loop import TrainingStopped, check_target_modules
from tunehouse.training.recipes import method as training_method
from tunehouse.training.recipes.reinforcement import GraderFailed
from tunehouse.usage.metering import record_training
from tunehouse.usage.quotas import estimate_columns
from tunehouse.webhooks.outbox import JOB_SUCCEEDED, enqueue_job_event

log = logging.getLogger("tunehouse.runner")

CHECKPOINTS_KEPT = 3  # OpenAI keeps the checkpoints of the last 3 epochs
MAX_WARNING_EVENTS = 20
RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
# A reinforcement job's result file has its rewards too.
REWARD_COLUMNS = [
    "train_reward_mean",
    "train_reward_std",
    "train_grader_error_rate",
    "valid_reward",
    "generated_tokens",
    "generation_seconds",
    "grading_seconds",
    "training_seconds",
]


class FineTuning:
    """The "fine_tuning" job kind (jobs/kinds.py)."""

    name = "fine_tuning"
    phase_names = {"validate": "validation", "train": "training"}  # as messages name them

    def validate(self, ctx: JobContext) -> None:
        validate(ctx)

    def train(self, ctx: JobContext) -> None:
        train(ctx)

    def discard(self, settings, *, organization_id: str, job_id: str) -> None:
        """The job ended: its saved training state is of no more use."""
        discard_training_state(settings, organization_id=organization_id, job_id=job_id)


def job_files(ctx: JobContext, job: Job) -> tuple[Path, Path | None] | None:
    """The job's training and validation files on disk; None (the job failed) when one is gone."""
    paths = ctx.input_files(("training_file", job.training_file), ("validation_file", job.validation_file))
    return None if paths is None else (paths[0], paths[1])


def validate(ctx: JobContext) -> None:
    # transformers takes seconds to import: only the phase's own process pays it, not every
    # server and worker that imports this module to look the kind up.
    from transformers import AutoTokenizer

    job = ctx.load()
    paths = job_files(ctx, job)
    if paths is None:
        return
    train_path, valid_path = paths
    base = resolve_base_model(ctx.settings, job.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    method_type = job.method["type"]
    requested = job.method[method_type]["hyperparameters"]
    # The time estimate needs this machine's training speed on this base: on a fresh install
    # (no job of this base finished here yet) a short probe measures it once (training/throughput.py).
    tokens_per_second = throughput.tokens_per_second(ctx.settings.home, job.base_model)
    if tokens_per_second is None and ctx.settings.throughput_probe:
        with ctx.db.transaction() as s:
            add_event(
                s, job.id, f"Measuring this machine's training speed on {job.base_model} (once, a few steps)"
            )
        tokens_per_second = throughput.ensure_measured(
            ctx.settings.home, job.base_model, base.path, dtype=ctx.settings.dtype
        )
    report = check_files(
        train_path,
        validation=valid_path,
        tokenizer=tokenizer,
        context_length=context_length_for(base.path),
        method=method_type,
        n_epochs=requested.get("n_epochs", "auto"),
        overlap_is_error=bool((job.options or {}).get("overlap_is_error")),
        tokens_per_second=tokens_per_second,
        # The price quoted when the job was created (usage/prices.py), or the default.
        **({"price_per_million": job.training_price} if job.training_price is not None else {}),
    )
    if not report.ok:
        code, message = report.job_error()
        ctx.fail(code=code, message=message, param=report.error_param)
        return
    if method_type == "reinforcement":
        for path, param in ((train_path, "training_file"), (valid_path, "validation_file")):
            problem = missing_references(job.method["reinforcement"]["grader"], path) if path else None
            if problem:
                ctx.fail(
                    code="invalid_training_file" if param == "training_file" else "invalid_validation_file",
                    message=problem,
                    param=param,
                )
                return

    try:
        hp = training_method(method_type).resolve_hyperparameters(requested, report.n_examples)
    except ValueError as e:
        ctx.fail(code="invalid_hyperparameters", message=str(e), param="method")
        return
    gpus = queue.gpus_for(base.path, options=job.options, gpu_min_params=ctx.settings.gpu_min_params)
    resolved = {**requested, **hp.to_dict()}  # keeps the LoRA extension fields as requested
    if resolved.get("lora_target_modules") and not (job.options or {}).get("init_model"):
        # A name that matches no layer would only fail once training starts; say so now.
        unknown = check_target_modules(base.path, resolved["lora_target_modules"])
        if unknown:
            ctx.fail(
                code="invalid_hyperparameters",
                message=f"lora_target_modules: {', '.join(unknown)} match no linear layer of "
                f"{job.base_model}.",
                param=f"method.{method_type}.hyperparameters.lora_target_modules",
            )
            return
    method = {**job.method, method_type: {**job.method[method_type], "hyperparameters": resolved}}
    est = report.estimate or {}
    with ctx.db.transaction() as s:
        n = s.execute(
            update(Job)
            .where(*ctx.mine(st.VALIDATING))
            .values(
                status=st.QUEUED,
                method=method,
                worker_id=None,
                lease_expires_at=None,
                gpus_required=gpus,
                **estimate_columns(job, est),  # the job's estimated cost, before training
            )
        ).rowcount
        if not n:
            raise JobGone(ctx.job_id)
        offered = queue.max_gpus_offered(ctx.db, alive_within=ctx.settings.lease_seconds)
        if gpus and (offered or 0) < gpus:
            add_event(
                s,
                job.id,
                f"This job needs a worker with {gpus} GPU(s); none of the running workers has "
                f"{'one' if gpus == 1 else 'that many'}. It waits in the queue until one starts "
                "(`tunehouse worker --gpus N` on a GPU machine).",
                level="warn",
            )
        warnings = report.warnings + (report.validation.warnings if report.validation else [])
        for p in warnings[:MAX_WARNING_EVENTS]:
            add_event(s, job.id, f"Warning: {p}", level="warn")
        if len(warnings) > MAX_WARNING_EVENTS:
            add_event(
                s,
                job.id,
                f"… and {len(warnings) - MAX_WARNING_EVENTS} more warnings "
                "(`tunehouse data check` lists them all)",
                level="warn",
            )
        if est:
            eta = (
                (
                    f"; about {est['estimated_seconds']:.0f} s of training at this machine's measured "
                    f"{est['tokens_per_second']:.0f} tokens/s"
                )
                if est.get("estimated_seconds")
                else ""
            )
            add_event(
                s,
                job.id,
                f"Training file has {report.n_examples} examples; {est['billable_tokens']} billable tokens "
                f"over {hp.n_epochs} epoch(s) (estimated cost ${est['cost_usd']:.4f} at "
                f"${est['price_per_million_tokens']:g} per million tokens){eta}",
                data={"n_examples": report.n_examples, **est},
            )
        add_event(s, job.id, "Files validated, moving job to queued state")


def train(ctx: JobContext) -> None:
    job = ctx.load()
    with ctx.db.session() as s:
        org = s.scalar(select(Organization).where(Organization.id == job.organization_id))
    model_name = ids.fine_tuned_model_name(
        base=job.base_model, org_slug=org.slug, suffix=job.suffix, job_id=job.id
    )
    base = resolve_base_model(ctx.settings, job.base_model)
    method_type = job.method["type"]
    method = training_method(method_type)
    hp_dict = job.method[method_type]["hyperparameters"]
    paths = job_files(ctx, job)
    if paths is None:
        return
    train_path, valid_path = paths
    init_adapter = continued_from(ctx, job)
    if init_adapter is False:
        return
    fine_tuning_type = hp_dict.get("fine_tuning_type", "lora")  # jobs from before full FT: lora
    if ctx.world_size > 1:
        join_workers(ctx.rank, ctx.world_size)
    start_path = base.path
    if init_adapter is not None and not (init_adapter / "adapter_config.json").is_file():
        # A fully fine-tuned model's checkpoint is a whole model folder: training starts from it.
        start_path, init_adapter = init_adapter, None
    state_dir = ctx.work_dir / "state"
    # Storage elsewhere (another machine may have trained this job last): its newest saved
    # state, when it is past the one here. With storage in the home there is nothing to copy.
    # (Rank 0 only: the other data-parallel workers read what it put in place.)
    stored = (
        stored_state(ctx.settings, organization_id=job.organization_id, job_id=job.id)
        if ctx.rank == 0
        else None
    )
    if stored is not None:
        stored.fetch_newer(state_dir)
    if ctx.rank > 0:
        hooks = FollowerHooks()
    else:
        with ctx.db.transaction() as s:
            started_before = s.scalar(
                select(JobEvent.seq)
                .where(JobEvent.job_id == job.id, JobEvent.message == "Fine-tuning job started")
                .limit(1)
            )
            if started_before is None:
                add_event(s, job.id, "Fine-tuning job started", data=None)
        hooks = JobHooks(ctx, model_name=model_name, base_model=job.base_model, stored=stored)
        hooks.planned_seconds = planned_seconds(ctx, job)
    common = dict(
        base_model_path=start_path,
        train_file=train_path,
        valid_file=valid_path,
        output_dir=ctx.work_dir / "train",
        hyperparameters=Hyperparameters(
            n_epochs=int(hp_dict["n_epochs"]),
            batch_size=int(hp_dict["batch_size"]),
            learning_rate_multiplier=float(hp_dict["learning_rate_multiplier"]),
        ),
        seed=job.seed,
        max_length=context_length_for(base.path),
        lora_rank=int(hp_dict.get("lora_rank", 16)),
        lora_alpha=int(hp_dict.get("lora_alpha", 32)),
        lora_target_modules=hp_dict.get("lora_target_modules"),
        fine_tuning_type=fine_tuning_type,
        dtype=ctx.settings.dtype,
        device=device_for(ctx),
        # The full training state (weights, optimizer, scheduler, data position, RNG) is saved
        # periodically and on pause; a paused, restarted or taken-over job continues from it.
        state_dir=state_dir,
        save_state_every_seconds=ctx.settings.state_save_seconds,
        resume=True,
        init_adapter_path=init_adapter,
    )
    spec = method.make_spec(common, hp_dict)
    if method_type == "reinforcement":
        spec.sampler = rollout_sampler(
            job.method["reinforcement"].get("response_format"), spec.base_model_path
        )
        spec.rewarder = reinforcement_rewarder(ctx, job.method["reinforcement"]["grader"])
    started = time.monotonic()
    try:
        result = method.train(spec, hooks)
    except (TrainingStopped, JobGone) as e:
        log.info("job %s stopped", job.id)
        if isinstance(e, TrainingStopped) and ctx.rank == 0 and ctx.ended():
            discard_training_state(ctx.settings, organization_id=job.organization_id, job_id=job.id)
        return
    except GraderFailed as e:
        # The grader's, not the machine's: running the step again would fail the same way.
        if ctx.rank == 0 and ctx.fail(
            code="grader_failed", message=str(e), param="method.reinforcement.grader"
        ):
            discard_training_state(ctx.settings, organization_id=job.organization_id, job_id=job.id)
        return
    if ctx.rank > 0:
        return  # rank 0 records the outcome
    # A resumed run's wall time says nothing about speed; a full fine-tuning run's speed is not
    # the LoRA speed the estimates before a job are made from.
    if hooks.resumed_from is None and fine_tuning_type == "lora":
        throughput.record(
            ctx.settings.home, job.base_model, result.trained_tokens / (time.monotonic() - started)
        )
    try:
        evaluate(ctx, job, model_name=model_name, valid_path=valid_path)
    except JobGone:
        raise
    except Exception as e:
        # The model trained well enough to keep: a failed measurement is reported, not fatal.
        log.exception("job %s: evaluation failed", job.id)
        with ctx.db.transaction() as s:
            add_event(
                s, job.id, f"Evaluation of the fine-tuned model failed: {type(e).__name__}: {e}", level="warn"
            )
    finish(ctx, job, model_name=model_name, trained_tokens=result.trained_tokens, rows=hooks.rows)
    shutil.rmtree(ctx.work_dir / "train", ignore_errors=True)
    discard_training_state(ctx.settings, organization_id=job.organization_id, job_id=job.id)


def planned_seconds(ctx: JobContext, job: Job) -> float | None:
    """The whole run's training time from its billable tokens and this machine's measured speed."""
    tps = throughput.tokens_per_second(ctx.settings.home, job.base_model)
    if not tps or not job.estimated_tokens:
        return None
    return job.estimated_tokens / tps


def device_for(ctx: JobContext) -> str:
    """With several data-parallel workers on one machine, each has a GPU of its own."""
    if ctx.world_size > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get(DP_LOCAL_RANK, '0'))}"
    return "auto"


def continued_from(ctx: JobContext, job: Job) -> Path | None | bool:
    """The adapter a continued-training job starts from; False when it is gone (job failed)."""
    name = (job.options or {}).get("init_model")
    if not name:
        return None
    with ctx.db.session() as s:
        row = s.scalar(
            select(Checkpoint).where(
                Checkpoint.model_name == name, Checkpoint.organization_id == job.organization_id
            )
        )
    path = ctx.weights.path(row.path) if row else None
    if path is None or not path.exists():
        ctx.fail(
            code="model_not_found",
            message=f"The model {name} to continue training from was deleted.",
            param="model",
        )
        return False
    return path


def finish(ctx: JobContext, job: Job, *, model_name: str, trained_tokens: int, rows: list[dict]) -> None:
    import base64  # the result file is base64 of the CSV, as OpenAI serves it (README)

    buf = io.StringIO()
    rewards = any(r.get("train_reward_mean") is not None for r in rows)
    columns = RESULT_COLUMNS + (REWARD_COLUMNS if rewards else [])
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()})
    result = None
    try:
        with ctx.db.transaction() as s:
            result = files.create_file(
                s,
                ctx.files,
                organization_id=job.organization_id,
                filename=f"step_metrics_{job.id}.csv",
                purpose="fine-tune-results",
                data=base64.b64encode(buf.getvalue().encode()),
            )
            n = s.execute(
                update(Job)
                .where(*ctx.mine(st.RUNNING))
                .values(
                    status=st.SUCCEEDED,
                    estimated_finish=None,  # null once the job is not running (OpenAI's rule)
                    fine_tuned_model=model_name,
                    trained_tokens=trained_tokens,
                    result_files=[result.id],
                    finished_at=now(),
                    worker_id=None,
                    lease_expires_at=None,
                )
            ).rowcount
            if not n:
                raise JobGone(ctx.job_id)  # rolls the result file's row back
            add_event(s, job.id, f"New fine-tuned model created: {model_name}")
            add_event(s, job.id, "The job has successfully completed")
            # In the transaction that won the status change: metered and announced exactly once.
            record_training(s, ctx.settings, job_id=job.id)
            enqueue_job_event(s, job_id=job.id, event_type=JOB_SUCCEEDED, organization_id=job.organization_id)
    except JobGone:
        if result is not None:
            files.delete_bytes(ctx.files, result.path)  # so nothing is left half-written
        raise


def join_workers(rank: int, world_size: int) -> None:
    """Join the other data-parallel training processes of this job in one torch.distributed group:
    NCCL on GPUs, else gloo."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get(DP_LOCAL_RANK, "0")))
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{os.environ[DP_MASTER]}", rank=rank, world_size=world_size
        )


class FollowerHooks:
    """The hooks of a data-parallel worker other than rank 0: rank 0 alone records events, metrics,
    checkpoints and state, and decides when all stop (the recipe passes its answer on)."""

    def __init__(self):
        self._parent = os.getppid()

    def on_start(self, *, total_steps: int) -> None:
        pass

    def on_metrics(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, *, step: int, path: Path, metrics: dict[str, float], is_final: bool) -> None:
        pass

    def should_stop(self) -> bool:
        if os.getppid() != self._parent:  # our launcher died: stop writing (we write nothing anyway)
            raise JobGone("launcher gone")
        return False


class JobHooks:
    """Training progress → events, checkpoints and the results table; cancellation → stop."""

    def __init__(self, ctx: JobContext, *, model_name: str, base_model: str, stored: StoredState | None):
        self.ctx = ctx
        # The job's states in storage, when storage is not this home: each save is copied there.
        self.stored = stored
        self.model_name = model_name
        self.base_model = base_model
        self.rows: list[dict] = []
        self._last_check = 0.0
        self._parent = os.getppid()
        self.total_steps = 0
        self.resumed_from: int | None = None
        self.stop_requested = False
        self._publish_warned = False
        # estimated_finish: from the planned time until the first step is done, then from the
        # pace of this run's steps (t0, step0: when and where this run started).
        self.planned_seconds: float | None = None
        self._t0 = time.monotonic()
        self._step0 = 0
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.stop_requested = True

    def on_start(self, *, total_steps: int) -> None:
        self.total_steps = total_steps
        self._t0, self._step0 = time.monotonic(), 0
        if self.planned_seconds is not None:
            self._set_estimated_finish(self.planned_seconds)

    def _set_estimated_finish(self, seconds_left: float) -> None:
        try:
            with self.ctx.db.transaction() as s:
                s.execute(
                    update(Job)
                    .where(*self.ctx.mine(st.RUNNING))
                    .values(estimated_finish=int(time.time() + seconds_left))
                )
        except OperationalError:
            log.warning("job %s: database unreachable; estimated_finish not updated", self.ctx.job_id)

    def _update_estimate(self, step: int) -> None:
        """The time left at this run's pace so far (it moves as the job proceeds)."""
        done = step - self._step0
        if done > 0 and self.total_steps:
            per_step = (time.monotonic() - self._t0) / done
            self._set_estimated_finish(per_step * max(self.total_steps - step, 0))

    def on_resume(self, *, step: int) -> None:
        """Continue the record from `step`: what was logged after it is redone, so it is dropped
        (no duplicated metrics), and the results table is rebuilt from what stays."""
        self.resumed_from = step
        self._t0, self._step0 = time.monotonic(), step
        if self.planned_seconds is not None and self.total_steps:
            self._set_estimated_finish(self.planned_seconds * (1 - step / self.total_steps))
        with self.ctx.db.transaction() as s:
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id == self.ctx.job_id, JobEvent.type == "metrics")
            ):
                if (e.data or {}).get("step", 0) > step:
                    s.delete(e)
                else:
                    d = e.data
                    self.rows.append(
                        {
                            "step": d["step"],
                            "train_loss": d.get("train_loss"),
                            "train_accuracy": d.get("train_mean_token_accuracy"),
                            "valid_loss": d.get("valid_loss"),
                            "valid_mean_token_accuracy": d.get("valid_mean_token_accuracy"),
                        }
                    )
            add_event(s, self.ctx.job_id, f"Fine-tuning job resumed from step {step}")
        self.rows.sort(key=lambda r: r["step"])

    def on_metrics(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.rows.append(
            {
                "step": step,
                "train_loss": metrics.get("train_loss"),
                "train_accuracy": metrics.get("train_mean_token_accuracy"),
                "valid_loss": metrics.get("valid_loss"),
                "valid_mean_token_accuracy": metrics.get("valid_mean_token_accuracy"),
                **{k: metrics.get(k) for k in REWARD_COLUMNS if k in metrics},
            }
        )
        self._update_estimate(step)
        with self.ctx.db.transaction() as s:
            add_event(
                s,
                self.ctx.job_id,
                metrics_message(step, total_steps, metrics),
                type="metrics",
                data={"step": step, "total_steps": total_steps, **metrics},
            )

    def on_samples(self, *, step: int, samples: list[dict]) -> None:
        """A reinforcement step's prompts with their sampled answers and rewards, as an event."""
        if not samples:
            return
        first = samples[0]
        best = max(range(len(first["rewards"])), key=lambda i: first["rewards"][i])
        with self.ctx.db.transaction() as s:
            add_event(
                s,
                self.ctx.job_id,
                f"Step {step} samples: best answer (reward {first['rewards'][best]:.3f}): "
                f"{first['answers'][best][:200]!r}",
                type="message",
                data={"step": step, "samples": samples},
            )

    def on_state_saved(self, *, step: int, path: Path) -> None:
        """Copy the state just saved here to storage, when storage is not this home: a worker on
        another machine that takes the job over resumes from it (jobs/state_store.py)."""
        stored = self.stored
        if stored is None:
            return
        try:
            state = queue.job_state(self.ctx.db, self.ctx.job_id)
        except OperationalError:
            # Whether the job is still ours is unknown: keep the state here; the next save publishes.
            log.warning("job %s: database unreachable; training state not copied to storage", self.ctx.job_id)
            return
        if state is None or state[1] != self.ctx.worker_id:
            raise JobGone(self.ctx.job_id)  # another worker owns the job and its stored state now
        if state[0] in st.TERMINAL:
            return  # cancelled: the state is deleted as this process stops
        try:
            stored.publish(path, step=step)
        except Exception as e:
            # The previous stored state stays complete; training goes on, and the next save retries.
            if is_disk_full(e):
                raise
            log.warning(
                "job %s: could not copy the training state to storage", self.ctx.job_id, exc_info=True
            )
            if not self._publish_warned:
                self._publish_warned = True
                with self.ctx.db.transaction() as s:
                    add_event(
                        s,
                        self.ctx.job_id,
                        f"Warning: the training state at step {step} could not be copied to storage "
                        f"({f'{type(e).__name__}: {e}'[:300]}); a worker on another machine would "
                        "resume from an older one",
                        level="warn",
                    )

    def on_checkpoint(self, *, step: int, path: Path, metrics: dict[str, float], is_final: bool) -> None:
        job_id = self.ctx.job_id
        with self.ctx.db.session() as s:
            org_id = s.scalar(select(Job.organization_id).where(Job.id == job_id))
        key = f"{org_id}/{job_id}/step-{step}"
        self.ctx.weights.put_dir(path, key)  # atomic: readers never see a half-copied adapter
        name = self.model_name if is_final else ids.checkpoint_model_name(self.model_name, step)
        with self.ctx.db.transaction() as s:
            # Redone after a resume: replace the earlier registration of the same checkpoint.
            for dup in s.scalars(select(Checkpoint).where(Checkpoint.model_name == name)):
                s.delete(dup)
            s.flush()
            s.add(
                Checkpoint(
                    id=ids.checkpoint_id(),
                    job_id=job_id,
                    organization_id=org_id,
                    model_name=name,
                    base_model=self.base_model,
                    step_number=step,
                    metrics={"step": step, **metrics},
                    path=key,
                    is_final=is_final,
                )
            )
            if not is_final:
                add_event(s, job_id, f"Checkpoint created at step {step} with Snapshot ID: {name}")
            old = list(
                s.scalars(
                    select(Checkpoint)
                    .where(Checkpoint.job_id == job_id)
                    .order_by(Checkpoint.step_number.desc())
                    .offset(CHECKPOINTS_KEPT)
                )
            )
            for c in old:
                s.delete(c)
        for c in old:
            self.ctx.weights.delete(c.path)

    def should_stop(self) -> bool:
        """True: stop and save the training state (our worker asked, or the job was paused or
        cancelled). Raises JobGone when the job is no longer ours (our worker died, or another
        worker took the job over): then nothing may be written, not even the state."""
        if os.getppid() != self._parent:
            raise JobGone(self.ctx.job_id)
        t = time.monotonic()
        if t - self._last_check > 2.0 or self.stop_requested:
            self._last_check = t
            try:
                state = queue.job_state(self.ctx.db, self.ctx.job_id)
                self._db_ok_at = t
            except OperationalError:
                # The database is unreachable: keep training while our lease may still hold (our
                # worker renews it once the database is back); past that, stop writing anything.
                if t - getattr(self, "_db_ok_at", t) > self.ctx.settings.lease_seconds:
                    raise JobGone(self.ctx.job_id) from None
                log.warning("job %s: database unreachable; training on", self.ctx.job_id)
                return self.stop_requested
            if state is None or state[1] != self.ctx.worker_id:
                raise JobGone(self.ctx.job_id)
            if state[0] != st.RUNNING:
                return True
        return self.stop_requested
