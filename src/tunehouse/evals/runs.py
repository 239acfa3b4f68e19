"""Executing an eval run: every item not yet graded is generated (completions runs) or read with
its given sample (jsonl runs), graded by each testing criterion, and written as an output item.

Items are written one by one as they finish, each in its own transaction with the usage it cost,
and (run, item) is unique: a run whose process was killed starts again, skips the items already
written and does the rest, so nothing is lost, written twice or metered twice. The run's counts
(result_counts, per_testing_criteria_results, per_model_usage) are always computed from the stored
items (`summarize`), while it runs and once more, stored, when it ends.

What starts and ends the run (its job's status, the webhook) is the eval_run job kind's
(jobs/eval_run.py); this module knows nothing of jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest, ModelNotFound
from tunehouse.evals.definitions import graders_of
from tunehouse.evals.generation import Generator, GenResult, resolve_model
from tunehouse.evals.sources import (
    Line,
    RunSource,
    given_sample,
    lines_from_content,
    lines_from_jsonl,
    parse_run_data_source,
    prompt_messages,
    sampling_params,
)
from tunehouse.graders import Grader, GradeResult, ModelSampler, Sample
from tunehouse.graders.templates import TemplateError
from tunehouse.inference.engine import SamplingParams
from tunehouse.store import files
from tunehouse.store.blobs import Blobs
from tunehouse.store.engine import Database
from tunehouse.store.tables import Eval, EvalOutputItem, EvalRun
from tunehouse.usage.prices import price_for
from tunehouse.usage.records import INFERENCE, add_usage

log = logging.getLogger(__name__)

PASS, FAIL, ERROR = "pass", "fail", "error"
# Items graded at once: model graders' requests reach the engine together (it batches them).
GRADING_THREADS = 8


class RunFailed(Exception):
    """The run cannot go on at all (its file or model was deleted): the run fails with this."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class _Stopped(Exception):
    pass


def load_lines(session: Session, blobs: Blobs, source: RunSource) -> list[Line]:
    if source.file_id is None:
        return lines_from_content(source.source)
    row = files.get_file(session, source.file_id)
    path = files.file_path(blobs, row) if row is not None else None
    if path is None or not path.exists():
        raise RunFailed(
            "invalid_file",
            f"The data source file {source.file_id} was deleted before the run could read it.",
            "data_source.source.id",
        )
    lines, problems = lines_from_jsonl(path.read_text(encoding="utf-8", errors="replace"))
    if problems:  # checked when the run was created; a file does not change
        raise RunFailed(
            "invalid_file", f"The data source file has problems: {problems[0]}", "data_source.source.id"
        )
    return lines


def usage_entry(prompt_tokens: int, completion_tokens: int, invocations: int = 1) -> dict[str, int]:
    return {
        "invocation_count": invocations,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cached_tokens": 0,
    }


def wire_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An output item sample's `usage`."""
    return {
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": 0,
    }


def _add(total: dict[str, dict], model: str, entry: dict) -> None:
    into = total.setdefault(model, usage_entry(0, 0, 0))
    for k in into:
        into[k] += int(entry.get(k) or 0)


@dataclass
class Graded:
    results: list[dict[str, Any]]
    status: str
    usage: dict[str, dict]


class Executor:
    """One run's items: grade, then write each (idempotently, metered in the same transaction)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        run: EvalRun,
        criteria: list[dict],
        graders: list[Grader],
        sampler: ModelSampler | None,
        should_stop: Callable[[], bool],
    ):
        self.db = db
        self.settings = settings
        self.run = run
        self.criteria = criteria
        self.graders = graders
        self.sampler = sampler
        self.should_stop = should_stop

    def grade(self, line: Line, sample: Sample) -> Graded:
        results, usage = [], {}
        errored = failed = False
        for criterion, grader in zip(self.criteria, self.graders, strict=True):
            try:
                r: GradeResult = grader.grade(sample, line.item, sampler=self.sampler)
            except ModelNotFound as e:
                raise RunFailed(
                    "model_not_found",
                    f"A testing criterion ({criterion['id']}) samples a model that no longer exists: {e.message}",
                    "testing_criteria",
                ) from None
            passed = grader.passed(r)
            entry: dict[str, Any] = {
                "name": criterion["id"],
                "type": grader.type,
                "score": r.reward,
                "passed": passed,
                "sample": None,
            }
            if r.label is not None:
                entry["label"] = r.label
            if r.errored:
                entry["error"] = {"code": "grader_error", "message": r.error_message or "the grader failed"}
                entry["errors"] = r.errors.to_dict()
            results.append(entry)
            errored |= r.errored
            failed |= not passed
            for model, u in r.model_usage.items():
                _add(usage, model, u)
        status = ERROR if errored else FAIL if failed else PASS
        return Graded(results, status, usage)

    def write(self, line: Line, graded: Graded, sample: dict | None) -> None:
        row = EvalOutputItem(
            id=ids.eval_output_item_id(),
            run_id=self.run.id,
            eval_id=self.run.eval_id,
            datasource_item_id=line.index,
            datasource_item=line.item,
            results=graded.results,
            sample=sample,
            status=graded.status,
            usage=graded.usage,
        )
        try:
            with self.db.transaction() as s:
                s.add(row)
                s.flush()  # the unique (run, item) constraint speaks here, before anything is metered
                for model, u in graded.usage.items():
                    add_usage(
                        s,
                        organization_id=self.run.organization_id,
                        project_id=self.run.project_id,
                        key_id=None,
                        model=model,
                        kind=INFERENCE,
                        input_tokens=u["prompt_tokens"],
                        output_tokens=u["completion_tokens"],
                        requests=u["invocation_count"],
                        cost=price_for(self.settings, model).inference_cost(
                            u["prompt_tokens"], u["completion_tokens"]
                        ),
                    )
        except IntegrityError:
            # Written already (by this run before it was killed, or by a process that lost the job).
            log.info("run %s: item %d was already written", self.run.id, line.index)

    # --- jsonl: the samples are given ---------------------------------------------------------------
    def given(self, line: Line) -> None:
        if self.should_stop():
            return
        sample = given_sample(line.sample) or Sample(output_text="")
        graded = self.grade(line, sample)
        self.write(line, graded, _given_sample_wire(line.sample, sample))

    # --- completions: the run's model answers each item ----------------------------------------------
    def generated(self, line: Line, messages: list[dict], result: GenResult, params: SamplingParams) -> None:
        model = self.run.model
        ran = result.error is None or result.prompt_tokens or result.completion_tokens
        # A prompt the engine refused (too long for the context) cost nothing and is not counted.
        usage = {model: usage_entry(result.prompt_tokens, result.completion_tokens)} if ran else {}
        wire = _generated_sample_wire(model, messages, result, params)
        if result.error is not None:
            graded = Graded([], ERROR, usage)
        else:
            graded = self.grade(line, Sample.from_text(result.text))
            for m, u in graded.usage.items():
                _add(usage, m, u)
            graded.usage = usage
        self.write(line, graded, wire)

    def unrenderable(self, line: Line, messages_error: str, params: SamplingParams) -> None:
        """An item whose prompt cannot be made (checked at create time; here only if it changed)."""
        wire = _generated_sample_wire(
            self.run.model, [], GenResult(finish_reason="error", error=messages_error), params
        )
        self.write(line, Graded([], ERROR, {}), wire)


def _given_sample_wire(given: dict | None, sample: Sample) -> dict[str, Any]:
    """OpenAI's output item `sample` for a jsonl line: the given answer; nothing was sampled, so the
    sampling fields are null."""
    given = given or {}
    finish_reason = given.get("finish_reason")
    model = given.get("model")
    return {
        "input": [],
        "output": [{"role": "assistant", "content": sample.output_text}] if given else [],
        "finish_reason": finish_reason if isinstance(finish_reason, str) else ("stop" if given else ""),
        "model": model if isinstance(model, str) else "",
        "usage": wire_usage(0, 0),
        "error": None,
        "temperature": None,
        "max_completion_tokens": None,
        "top_p": None,
        "seed": None,
    }


def _generated_sample_wire(
    model: str, messages: list[dict], result: GenResult, params: SamplingParams
) -> dict[str, Any]:
    return {
        "input": [{"role": m["role"], "content": m["content"]} for m in messages],
        "output": [] if result.error is not None else [{"role": "assistant", "content": result.text}],
        "finish_reason": result.finish_reason,
        "model": model,
        "usage": wire_usage(result.prompt_tokens, result.completion_tokens),
        "error": None if result.error is None else {"code": "generation_error", "message": result.error},
        "temperature": params.temperature,
        "max_completion_tokens": params.max_tokens,
        "top_p": params.top_p,
        "seed": params.seed,
    }


def execute(
    db: Database,
    settings: Settings,
    blobs: Blobs,
    *,
    run_id: str,
    generator: Generator,
    should_stop: Callable[[], bool],
) -> int:
    """Grade and write every item of the run that has no output item yet. Returns how many of the
    run's items still have none (0 unless it stopped early). Raises RunFailed."""
    with db.session() as s:
        run = s.scalar(select(EvalRun).where(EvalRun.id == run_id))
        if run is None:
            raise RunFailed("not_found", f"The run {run_id} was deleted.")
        ev = s.scalar(select(Eval).where(Eval.id == run.eval_id))
        if ev is None:
            raise RunFailed("not_found", f"The eval {run.eval_id} of the run was deleted.")
        source = parse_run_data_source(run.data_source)
        lines = load_lines(s, blobs, source)
        done = set(
            s.scalars(select(EvalOutputItem.datasource_item_id).where(EvalOutputItem.run_id == run_id))
        )
        ref = None
        if source.generates:
            try:
                ref = resolve_model(settings, s, run.model, param="data_source.model")
            except ModelNotFound:
                raise RunFailed(
                    "model_not_found",
                    f"The model {run.model} was deleted before the run could use it.",
                    "data_source.model",
                ) from None
    criteria = list(ev.testing_criteria)
    graders = graders_of(criteria)
    todo = [line for line in lines if line.index not in done]
    log.info("run %s: %d items, %d already written", run_id, len(lines), len(done))
    sampler = generator.sampler(db.session) if any(g.models() for g in graders) else None
    ex = Executor(
        db, settings, run=run, criteria=criteria, graders=graders, sampler=sampler, should_stop=should_stop
    )
    with ThreadPoolExecutor(GRADING_THREADS, thread_name_prefix="eval-grade") as pool:
        futures: list[Future] = []
        try:
            if source.generates:
                _generate(ex, generator, ref, source, todo, pool, futures)
            else:
                futures = [pool.submit(ex.given, line) for line in todo]
            for f in futures:
                f.result()  # the first error (RunFailed, the database) ends the run's attempt
        except _Stopped:
            pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    with db.session() as s:
        written = s.scalar(
            select(func.count()).select_from(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
        )
    return len(lines) - written


def _generate(
    ex: Executor, generator: Generator, ref, source: RunSource, todo: list[Line], pool, futures
) -> None:
    params = sampling_params(source)
    runnable: list[tuple[Line, list[dict]]] = []
    for line in todo:
        try:
            runnable.append((line, prompt_messages(source, line)))
        except (TemplateError, InvalidRequest) as e:
            futures.append(pool.submit(ex.unrenderable, line, str(getattr(e, "message", e)), params))
    if not runnable:
        return

    def on_result(k: int, result: GenResult) -> None:
        # Checked here too: the generator looks at should_stop only while no result arrives.
        if ex.should_stop():
            raise _Stopped()
        line, messages = runnable[k]
        futures.append(pool.submit(ex.generated, line, messages, result, params))

    generator.generate(ref, [m for _, m in runnable], params, on_result, should_stop=ex.should_stop)


# --------------------------------------------------------------------------------------------------
# Counts, from the stored items


def summarize(session: Session, run_id: str, criteria: list[dict]) -> dict[str, Any]:
    """OpenAI's result_counts, per_testing_criteria_results and per_model_usage of a run, from the
    output items written so far (null lists before the first)."""
    counts = {"total": 0, "errored": 0, "failed": 0, "passed": 0}
    per_criterion = {c["id"]: {"testing_criteria": c["id"], "passed": 0, "failed": 0} for c in criteria}
    usage: dict[str, dict] = {}
    rows = session.execute(
        select(EvalOutputItem.status, EvalOutputItem.results, EvalOutputItem.usage).where(
            EvalOutputItem.run_id == run_id
        )
    )
    for status, results, item_usage in rows:
        counts["total"] += 1
        counts[{PASS: "passed", FAIL: "failed"}.get(status, "errored")] += 1
        # An item that errored before grading (its sample could not be generated) fails every criterion.
        by_name = {r.get("name"): r for r in results or []}
        for name, tally in per_criterion.items():
            tally["passed" if by_name.get(name, {}).get("passed") else "failed"] += 1
        for model, u in (item_usage or {}).items():
            _add(usage, model, u)
    if counts["total"] == 0:
        return {"result_counts": counts, "per_model_usage": None, "per_testing_criteria_results": None}
    return {
        "result_counts": counts,
        "per_model_usage": [{"model_name": m, **u} for m, u in usage.items()] or None,
        "per_testing_criteria_results": list(per_criterion.values()),
    }


def store_summary(session: Session, run_id: str) -> None:
    """Fix the run's counts once it ended (in the transaction that ends it)."""
    run = session.scalar(select(EvalRun).where(EvalRun.id == run_id))
    ev = session.scalar(select(Eval).where(Eval.id == run.eval_id))
    summary = summarize(session, run_id, list(ev.testing_criteria))
    run.result_counts = summary["result_counts"]
    run.per_model_usage = summary["per_model_usage"]
    run.per_testing_criteria_results = summary["per_testing_criteria_results"]
