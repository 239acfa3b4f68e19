"""The batch job kind: a batch (/v1/batches) run on the job workers, with the queue, leases,
retries, crash resume and cancellation of every job. The job has the batch's id.

The API checked every line of the input file when the batch was created (api/batches/service.py,
with the chat and completions endpoints' own request models and checks) and stored each line's
request, ready for the engine, as one JSON line of the batch's plan (`plan_path` in the files
store): messages or prompts, tools, sampling parameters. So this module knows no HTTP types.

    validate   the batch goes from `validating` to `in_progress`
    train      every line with no output row yet is submitted to the engine at once (through
               evals.generation.Generator, as eval runs do): the engine decodes them together in
               batches and each line is written as soon as its answer is complete, in its own
               transaction with its usage (batch price), and (batch, line) is unique: a batch whose
               process was killed starts again and does only the rest, never a line twice. Then
               `finalizing`: the output and error files (OpenAI's lines) are written, and the
               batch ends `completed`, or `cancelled` (cancel asked: the lines done so far),
               or `expired` (its 24h window passed: the rest are `batch_expired` errors).

A batch's response bodies are shaped here as the chat and completions endpoints shape theirs
(`chat.completion`, `text_completion`), from the same engine results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from tunehouse import ids
from tunehouse.errors import ModelNotFound
from tunehouse.evals.generation import Generator, GenResult, resolve_model
from tunehouse.inference import output_items
from tunehouse.inference import tools as tool_calls
from tunehouse.inference.engine import ContextLengthExceeded, Delta, ModelRef, SamplingParams, TokenLogprob
from tunehouse.inference.output_items import OutputBuilder
from tunehouse.jobs import status as st
from tunehouse.jobs.context import JobContext, JobGone
from tunehouse.jobs.eval_run import StopCheck
from tunehouse.jobs.events import add_event
from tunehouse.store import files
from tunehouse.store.engine import Database
from tunehouse.store.tables import Batch, BatchOutput, Job, now
from tunehouse.usage.prices import price_for
from tunehouse.usage.records import BATCH, add_usage
from tunehouse.webhooks.outbox import (
    BATCH_CANCELLED,
    BATCH_COMPLETED,
    BATCH_EXPIRED,
    BATCH_FAILED,
    enqueue_job_event,
)

log = logging.getLogger("tunehouse.runner")

# OpenAI's batch statuses.
VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
ENDED = (FAILED, COMPLETED, EXPIRED, CANCELLED)
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES)
WINDOW_SECONDS = {"24h": 24 * 3600}
# How often a running batch looks at its own row (cancel asked).
CHECK_SECONDS = 1.0


# --------------------------------------------------------------------------------------------------
# The plan: what the API validated, one entry per input line


def plan_key(organization_id: str, batch_id: str) -> str:
    """Where a batch's plan lives in the files store (under its organization, like its files)."""
    return f"{organization_id}/{batch_id}.plan.jsonl"


def plan_params(params: SamplingParams) -> dict[str, Any]:
    """Sampling parameters as the plan stores them (JSON)."""
    out = asdict(params)
    out["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    return out


def _params(d: dict[str, Any]) -> SamplingParams:
    d = dict(d)
    d["logit_bias"] = {int(k): float(v) for k, v in (d.get("logit_bias") or {}).items()}
    return SamplingParams(**d)


def load_plan(ctx: JobContext, batch: Batch) -> list[dict]:
    path = ctx.files.path(batch.plan_path or plan_key(batch.organization_id, batch.id))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------------------------------
# Response bodies, shaped as /v1/chat/completions and /v1/completions shape theirs


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def chat_body(model: str, entry: dict, result: GenResult) -> dict[str, Any]:
    params = entry["params"]
    names, parallel, legacy = entry.get("tool_names"), entry.get("parallel", True), entry.get("legacy")
    choices = []
    for part in result.choices:
        text, reason, calls = part.text, part.finish_reason or "length", []
        if names is not None:
            text, calls = tool_calls.parse(text, names)
            if not parallel:
                calls = calls[:1]
            if calls and reason == "stop":
                reason = "function_call" if legacy else "tool_calls"
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        if calls and legacy:
            message["function_call"] = {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}
        elif calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ]
        choices.append(
            {
                "index": part.index,
                "message": message,
                "logprobs": _chat_logprobs(part.logprobs) if params.get("logprobs") else None,
                "finish_reason": reason,
            }
        )
    return {
        "id": ids.completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def response_body(model: str, entry: dict, result: GenResult) -> dict[str, Any]:
    """A /v1/responses line's Response object: the one the API made when it checked the line, with
    the output items built from the answer as the endpoint builds them (inference/output_items.py)."""
    params = entry["params"]
    builder = OutputBuilder(
        entry.get("tool_names"), max_calls=entry.get("max_calls"), logprobs=params.get("logprobs")
    )
    [part] = result.choices
    builder.feed(
        Delta(index=0, text=part.text, finish_reason=part.finish_reason or "length", logprobs=part.logprobs)
    )
    builder.finish()
    response = {**entry["response"], "id": ids.response_id(), "created_at": now(), "model": model}
    return output_items.finish(
        response,
        builder,
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        now=now(),
    )


def _legacy_logprobs(entries: list[TokenLogprob], start: int) -> dict[str, Any]:
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


def completion_body(model: str, entry: dict, results: list[GenResult], echoes: list[str]) -> dict[str, Any]:
    params = entry["params"]
    n = params.get("n", 1)
    choices = []
    for k, result in enumerate(results):
        echo = echoes[k] if entry.get("echo") else ""
        for part in result.choices:
            choices.append(
                {
                    "text": echo + part.text,
                    "index": k * n + part.index,
                    "logprobs": _legacy_logprobs(part.logprobs, len(echo))
                    if params.get("logprobs")
                    else None,
                    "finish_reason": part.finish_reason or "length",
                }
            )
    return {
        "id": ids.text_completion_id(),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
        "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)),
    }


def _error_response(status_code: int, message: str, *, type_: str, param: str | None, code: str | None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return {"status_code": status_code, "request_id": ids.request_id(), "body": body}


# --------------------------------------------------------------------------------------------------
# Writing a line (idempotent, metered in the same transaction)


class Lines:
    """Writes a batch's lines as they finish, each once."""

    def __init__(self, db: Database, settings, batch: Batch):
        self.db = db
        self.batch = batch
        self.price = price_for(settings, batch.model or "")
        self._lock = threading.Lock()

    def write(
        self,
        entry: dict,
        *,
        response: dict | None,
        error: dict | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        b = self.batch
        row = BatchOutput(
            id=ids.batch_request_id(),
            batch_id=b.id,
            line=entry["line"],
            custom_id=entry["custom_id"],
            ok=response is not None and response["status_code"] == 200,
            response=response,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        with self._lock:
            try:
                with self.db.transaction() as s:
                    s.add(row)
                    s.flush()  # the unique (batch, line) constraint speaks before anything is metered
                    if prompt_tokens or completion_tokens:
                        add_usage(
                            s,
                            organization_id=b.organization_id,
                            project_id=b.project_id,
                            key_id=b.key_id,
                            model=b.model or "",
                            kind=BATCH,
                            input_tokens=prompt_tokens,
                            output_tokens=completion_tokens,
                            requests=1,
                            cost=self.price.batch_cost(prompt_tokens, completion_tokens),
                        )
            except IntegrityError:
                log.info("batch %s: line %d was already written", b.id, entry["line"])

    def result(self, entry: dict, results: list[GenResult], echoes: list[str]) -> None:
        failed = next((r for r in results if r.error is not None), None)
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        if failed is not None:
            response = _error_response(
                500,
                f"The engine failed on this request: {failed.error}",
                type_="server_error",
                param=None,
                code=None,
            )
            self.write(entry, response=response, prompt_tokens=prompt, completion_tokens=completion)
            return
        model = self.batch.model or ""
        if self.batch.endpoint == CHAT:
            body = chat_body(model, entry, results[0])
        elif self.batch.endpoint == RESPONSES:
            body = response_body(model, entry, results[0])
        else:
            body = completion_body(model, entry, results, echoes)
        response = {"status_code": 200, "request_id": ids.request_id(), "body": body}
        self.write(entry, response=response, prompt_tokens=prompt, completion_tokens=completion)

    def refused(self, entry: dict, e: Exception) -> None:
        """A request the engine will not run (too long for the context): a 400, as the endpoint."""
        param = {CHAT: "messages", RESPONSES: "input"}.get(self.batch.endpoint, "prompt")
        code = "context_length_exceeded" if isinstance(e, ContextLengthExceeded) else "invalid_value"
        self.write(
            entry,
            response=_error_response(400, str(e), type_="invalid_request_error", param=param, code=code),
        )


# --------------------------------------------------------------------------------------------------
# The job kind


class BatchStop(StopCheck):
    """An eval run's stop check (SIGTERM, job cancelled or taken over, worker gone), plus the
    batch's own: cancel asked (`cancelling`) or its completion window passed."""

    def __init__(self, ctx: JobContext, batch: Batch):
        super().__init__(ctx)
        self.batch_id = batch.id
        self.outcome: str | None = None  # CANCELLED | EXPIRED once seen
        self._last_batch = 0.0

    def __call__(self) -> bool:
        if super().__call__() or self.outcome:
            return True
        t = time.monotonic()
        if t - self._last_batch >= CHECK_SECONDS:
            self._last_batch = t
            self.outcome = ending(self.ctx.db, self.batch_id)
        return self.outcome is not None


def ending(db: Database, batch_id: str) -> str | None:
    """CANCELLED when a cancel was asked, EXPIRED when the batch's window passed, else None."""
    with db.session() as s:
        row = s.execute(select(Batch.status, Batch.expires_at).where(Batch.id == batch_id)).first()
    if row is not None and row.status == CANCELLING:
        return CANCELLED
    if row is not None and row.expires_at is not None and time.time() > row.expires_at:
        return EXPIRED
    return None


class BatchKind:
    """The "batch" job kind (jobs/kinds.py)."""

    name = "batch"
    phase_names = {"validate": "validation", "train": "batch"}

    def validate(self, ctx: JobContext) -> None:
        with ctx.db.transaction() as s:
            n = s.execute(
                update(Job)
                .where(*ctx.mine(st.VALIDATING))
                .values(status=st.QUEUED, worker_id=None, lease_expires_at=None)
            ).rowcount
            if n:
                s.execute(
                    update(Batch)
                    .where(Batch.id == ctx.job_id, Batch.status == VALIDATING)
                    .values(status=IN_PROGRESS, in_progress_at=now())
                )

    def train(self, ctx: JobContext) -> None:
        execute(ctx)

    def discard(self, settings, *, organization_id: str, job_id: str) -> None:
        """Nothing to discard: the lines written are the batch's results, kept as they are."""


class _Stopped(Exception):
    pass


def _load_batch(ctx: JobContext) -> Batch:
    with ctx.db.session() as s:
        batch = s.scalar(select(Batch).where(Batch.id == ctx.job_id))
    if batch is None:
        raise JobGone(ctx.job_id)
    return batch


def execute(ctx: JobContext) -> None:
    batch = _load_batch(ctx)
    if batch.status == VALIDATING:  # the validate phase's update was lost: it is running now
        with ctx.db.transaction() as s:
            s.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == VALIDATING)
                .values(status=IN_PROGRESS, in_progress_at=now())
            )
    outcome = ending(ctx.db, batch.id)
    stop = BatchStop(ctx, batch)
    if outcome is None:
        generator = Generator(ctx.settings)
        try:
            _run(ctx, batch, generator, stop)
        except ModelNotFound:
            _fail(ctx, batch, f"The model {batch.model} was deleted before the batch could use it.")
            return
        finally:
            generator.close()
        if stop.requested or stop.gone:
            log.info("batch %s stopped", batch.id)
            return
        outcome = stop.outcome
    if outcome is None:
        with ctx.db.session() as s:
            written = s.scalar(
                select(func.count()).select_from(BatchOutput).where(BatchOutput.batch_id == batch.id)
            )
        if written < batch.request_total:
            # Not a stop and not a failure of the batch: let the runner retry what is left.
            raise RuntimeError(f"{batch.request_total - written} lines of the batch have no output")
        outcome = COMPLETED
    finalize(ctx, batch, outcome)


def _run(ctx: JobContext, batch: Batch, generator: Generator, stop: BatchStop) -> None:
    with ctx.db.session() as s:
        done = set(s.scalars(select(BatchOutput.line).where(BatchOutput.batch_id == batch.id)))
        ref = resolve_model(ctx.settings, s, batch.model or "")
    todo = [e for e in load_plan(ctx, batch) if e["line"] not in done]
    log.info("batch %s: %d lines, %d already written", batch.id, batch.request_total, len(done))
    if not todo:
        return
    lines = Lines(ctx.db, ctx.settings, batch)
    engine = generator.engine
    requests: list[tuple[int, list[int], SamplingParams]] = []
    owner: list[tuple[int, int]] = []  # request index -> (todo index, prompt k of that line)
    echoes: list[list[str]] = [[] for _ in todo]
    for i, entry in enumerate(todo):
        params = _params(entry["params"])
        try:
            prompts = _encode(engine, ref, batch.endpoint, entry)
        except (ContextLengthExceeded, ValueError) as e:
            lines.refused(entry, e)
            continue
        for k, (token_ids, echo) in enumerate(prompts):
            owner.append((i, k))
            requests.append((len(requests), token_ids, params))
            echoes[i].append(echo)
    got: dict[int, dict[int, GenResult]] = {}

    def on_result(index: int, result: GenResult) -> None:
        i, k = owner[index]
        results = got.setdefault(i, {})
        results[k] = result
        if len(results) == len(echoes[i]):
            lines.result(todo[i], [results[j] for j in range(len(results))], echoes[i])
            del got[i]
        if stop():  # checked here too: the generator looks only while no result arrives
            raise _Stopped()

    with contextlib.suppress(_Stopped):
        generator.run(ref, requests, on_result, should_stop=stop)


def _encode(engine, ref: ModelRef, endpoint: str, entry: dict) -> list[tuple[list[int], str]]:
    """The line's prompts as token ids, each with its text (a completions request's `echo`)."""
    if endpoint in (CHAT, RESPONSES):
        return [(engine.encode_chat(ref, entry["messages"], tools=entry.get("tools")), "")]
    vocab = engine.vocab_size(ref)
    out = []
    for p in entry["prompts"]:
        if isinstance(p, str):
            out.append((engine.encode_text(ref, p), p))
        else:
            if any(not 0 <= t < vocab for t in p):
                raise ValueError(f"Invalid 'prompt': token ids must be between 0 and {vocab - 1}.")
            out.append((list(p), engine.decode(ref, list(p))))
    return out


def _fail(ctx: JobContext, batch: Batch, message: str) -> None:
    with ctx.db.transaction() as s:
        s.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.status.notin_(ENDED))
            .values(
                status=FAILED,
                failed_at=now(),
                errors=[{"code": "model_not_found", "message": message, "param": "model", "line": None}],
            )
        )
    ctx.fail(code="model_not_found", message=message, param="model")


EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
EVENTS = {
    COMPLETED: BATCH_COMPLETED,
    CANCELLED: BATCH_CANCELLED,
    EXPIRED: BATCH_EXPIRED,
    FAILED: BATCH_FAILED,
}


def finalize(ctx: JobContext, batch: Batch, outcome: str) -> None:
    """Write the output and error files of the lines written, and end the batch with `outcome`."""
    if outcome == COMPLETED:
        with ctx.db.transaction() as s:
            s.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == IN_PROGRESS)
                .values(status=FINALIZING, finalizing_at=now())
            )
    if outcome == EXPIRED:  # what never ran is an error line each
        lines = Lines(ctx.db, ctx.settings, batch)
        with ctx.db.session() as s:
            done = set(s.scalars(select(BatchOutput.line).where(BatchOutput.batch_id == batch.id)))
        for entry in load_plan(ctx, batch):
            if entry["line"] not in done:
                lines.write(entry, response=None, error=dict(EXPIRED_ERROR))
    with ctx.db.session() as s:
        rows = list(
            s.scalars(select(BatchOutput).where(BatchOutput.batch_id == batch.id).order_by(BatchOutput.line))
        )
    good = [r for r in rows if r.ok]
    bad = [r for r in rows if not r.ok]
    created = now()
    expires = created + batch.output_expires_after if batch.output_expires_after else None
    keys: list[str] = []

    def store(rows: list[BatchOutput], name: str, s) -> str | None:
        if not rows:
            return None
        data = "".join(
            json.dumps({"id": r.id, "custom_id": r.custom_id, "response": r.response, "error": r.error})
            + "\n"
            for r in rows
        ).encode()
        file_id, key = files.new_file(organization_id=batch.organization_id)
        ctx.files.write_bytes(key, data)
        keys.append(key)
        files.add_file(
            s,
            file_id=file_id,
            key=key,
            organization_id=batch.organization_id,
            project_id=batch.project_id,
            filename=f"{batch.id}_{name}.jsonl",
            purpose="batch_output",
            size=len(data),
            expires_at=expires,
        )
        return file_id

    job_status = st.CANCELLED if outcome == CANCELLED else st.SUCCEEDED
    try:
        with ctx.db.transaction() as s:
            output_id, error_id = store(good, "output", s), store(bad, "error", s)
            n = s.execute(
                update(Job)
                .where(*ctx.mine(st.RUNNING))
                .values(status=job_status, finished_at=created, worker_id=None, lease_expires_at=None)
            ).rowcount
            if not n:
                raise JobGone(ctx.job_id)
            s.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status.notin_(ENDED))
                .values(
                    {
                        "status": outcome,
                        f"{outcome}_at": created,
                        "output_file_id": output_id,
                        "error_file_id": error_id,
                    }
                )
            )
            add_event(
                s, batch.id, f"The batch is {outcome}: {len(good)} requests succeeded, {len(bad)} failed"
            )
            enqueue_job_event(
                s, job_id=batch.id, event_type=EVENTS[outcome], organization_id=batch.organization_id
            )
    except BaseException:
        for key in keys:
            files.delete_bytes(ctx.files, key)
        raise
