"""A fine-tuning job's evaluation, after training and before the job succeeds (evals/checks.py
says what each measurement is):

1. With a grader (or an eval's testing criteria) and a validation file: the model the job started
   from and every kept checkpoint answer the validation prompts; each checkpoint's `metrics` gets
   its `valid_score`, the base's score is an event beside them.
2. With `select_checkpoint: "best"`: the job's model name serves the checkpoint that scored best
   (the last step's weights stay available as an ordinary checkpoint), and an event says which
   was chosen and why; ties go to the later step.
3. The forgetting and safety checks on the starting model and the final model (unless turned off):
   events with the figures, a warning event when the fine-tune clearly regressed.

Each score is stored as soon as it is known, so a job killed here and resumed scores only what
is missing. The summary is kept on the job (`options["evaluation_result"]`) and shown on the wire
as the job's `evaluation` (a tunehouse extension).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from tunehouse import ids
from tunehouse.evals.checks import (
    describe,
    forgetting_check,
    safety_check,
    score,
    validation_items,
)
from tunehouse.evals.generation import Generator, resolve_model
from tunehouse.graders import parse_grader
from tunehouse.inference.engine import SamplingParams
from tunehouse.jobs.context import JobContext, JobGone
from tunehouse.jobs.events import add_event
from tunehouse.store.tables import Checkpoint, Job

log = logging.getLogger("tunehouse.runner")

MAX_ANSWER_TOKENS = 256


def evaluate(ctx: JobContext, job: Job, *, model_name: str, valid_path: Path | None) -> None:
    spec = (job.options or {}).get("evaluation") or {}
    graders = [
        parse_grader(g, param=f"evaluation.graders[{i}]") for i, g in enumerate(spec.get("graders", []))
    ]
    general = spec.get("general_checks")
    general = ctx.settings.general_checks if general is None else general
    if not (graders and valid_path) and not general:
        return
    result: dict = dict((job.options or {}).get("evaluation_result") or {})
    generator = Generator(ctx.settings)
    try:
        with ctx.db.session() as s:
            # What the job started from: its base, or the fine-tune a continued job trains further.
            base = resolve_model(
                ctx.settings, s, job.model if job.model.startswith("ft:") else job.base_model
            )
        if graders and valid_path is not None:
            _score_checkpoints(ctx, job, generator, base, graders, valid_path, result)
            if spec.get("select_checkpoint") == "best":
                _promote_best(ctx, job, model_name, result)
        if general:
            with ctx.db.session() as s:
                final = resolve_model(ctx.settings, s, model_name)
            for check, what in ((forgetting_check, "answers"), (safety_check, "refuses")):
                name = check.__name__.removesuffix("_check")
                if name in result:
                    continue
                comparison = check(generator, base, final, seed=job.seed)
                result[name] = comparison.as_dict()
                _save(ctx, job, result, describe(comparison, what=what), warn=comparison.regressed)
    finally:
        generator.close()


def _score_checkpoints(ctx, job, generator, base, graders, valid_path, result) -> None:
    prompts, items = validation_items(valid_path)
    longest = max((len(str(item.get("reference", ""))) for item in items), default=0)
    # Room for an answer as long as the longest reference (about 4 characters a token), twice over.
    params = SamplingParams(
        max_tokens=min(MAX_ANSWER_TOKENS, max(16, longest // 2)), temperature=0.0, seed=job.seed
    )
    sampler = generator.sampler(ctx.db.session)
    names = ", ".join(g.name for g in graders)
    if "base_score" not in result:
        scored = score(generator, base, prompts, items, graders, params=params, sampler=sampler)
        result.update(base_score=scored.mean, graders=[g.name for g in graders], n_items=len(items))
        _save(
            ctx,
            job,
            result,
            f"Validation score of {job.model} (before fine-tuning): {scored.mean:.4f} "
            f"on {len(items)} examples ({names})",
        )
    with ctx.db.session() as s:
        rows = list(
            s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step_number))
        )
    for row in rows:
        if "valid_score" in (row.metrics or {}):
            continue
        with ctx.db.session() as s:
            ref = resolve_model(ctx.settings, s, row.model_name)
        scored = score(generator, ref, prompts, items, graders, params=params, sampler=sampler)
        with ctx.db.transaction() as s:
            current = s.scalar(select(Checkpoint).where(Checkpoint.id == row.id))
            if current is None:
                raise JobGone(job.id)
            current.metrics = {
                **current.metrics,
                "valid_score": scored.mean,
                "base_valid_score": result["base_score"],
            }
            add_event(
                s,
                job.id,
                f"Checkpoint at step {row.step_number}: validation score {scored.mean:.4f} "
                f"(base {result['base_score']:.4f})",
                data={
                    "step": row.step_number,
                    "valid_score": scored.mean,
                    "base_valid_score": result["base_score"],
                },
            )


def _promote_best(ctx: JobContext, job: Job, model_name: str, result: dict) -> None:
    if "chosen" in result:
        return
    with ctx.db.transaction() as s:
        rows = list(
            s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step_number))
        )
        final = next(r for r in rows if r.is_final)
        best = max(rows, key=lambda r: (r.metrics.get("valid_score", float("-inf")), r.step_number))
        last_score, last_step = final.metrics.get("valid_score"), final.step_number
        result["chosen"] = {"step": best.step_number, "valid_score": best.metrics.get("valid_score")}
        if best.id == final.id:
            message = (
                f"Kept the final checkpoint (step {final.step_number}) as {model_name}: its validation score "
                f"{last_score:.4f} is the best of the {len(rows)} checkpoints."
            )
        else:
            key = f"{job.organization_id}/{job.id}/promoted-step-{best.step_number}"
            ctx.weights.put_dir(ctx.weights.path(best.path), key)
            # The last step's weights stay usable as an ordinary checkpoint of their step.
            s.add(
                Checkpoint(
                    id=ids.checkpoint_id(),
                    job_id=job.id,
                    organization_id=final.organization_id,
                    project_id=final.project_id,
                    model_name=ids.checkpoint_model_name(model_name, final.step_number),
                    base_model=final.base_model,
                    step_number=final.step_number,
                    metrics=final.metrics,
                    path=final.path,
                    is_final=False,
                )
            )
            final.path = key
            final.step_number = best.step_number
            final.metrics = {**best.metrics, "promoted_from_step": best.step_number}
            message = (
                f"Promoted the checkpoint of step {best.step_number} to {model_name}: it scored best on the "
                f"validation set ({best.metrics['valid_score']:.4f}, against {last_score:.4f} at the last step, "
                f"step {last_step}); later steps overfit."
            )
        _record(s, job, result)
        add_event(s, job.id, message, data=result["chosen"])


def _save(ctx: JobContext, job: Job, result: dict, message: str, *, warn: bool = False) -> None:
    with ctx.db.transaction() as s:
        _record(s, job, result)
        add_event(s, job.id, message, level="warn" if warn else "info")


def _record(s, job: Job, result: dict) -> None:
    row = s.scalar(select(Job).where(Job.id == job.id))
    if row is None:
        raise JobGone(job.id)
    row.options = {**(row.options or {}), "evaluation_result": dict(result)}
