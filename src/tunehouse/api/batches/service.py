"""Batches as the API sees them: create, list, retrieve, cancel, scoped to the caller's project
like files and jobs (tenancy.scope).

Creating a batch reads its input file (purpose `batch`) and checks every line before anything
runs, collecting every problem with its line number (OpenAI's `errors.data`: code, message, param,
line): JSON, `custom_id` (present, unique), `method` POST, `url` equal to the batch's endpoint,
and the `body` through the endpoint's own request model and checks (api/chat, api/completions),
so a batch accepts exactly what the endpoint accepts; the model must be usable by the caller's
project, and one model serves the whole batch (as OpenAI requires). A file with problems makes a
batch that is `failed` at once, with its errors. A good one is stored as the batch's plan (each
line's request ready for the engine) and queued as a job of kind "batch" with the batch's id
(jobs/batch.py runs it); the batch is `validating` until a worker takes it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.api.batches.protocol import Batch as WireBatch
from tunehouse.api.batches.protocol import (
    BatchError,
    BatchErrors,
    BatchList,
    BatchRequestCounts,
    BatchUsage,
    CreateBatchRequest,
)
from tunehouse.api.chat import service as chat
from tunehouse.api.chat.protocol import ChatCompletionRequest
from tunehouse.api.completions import service as completions
from tunehouse.api.completions.protocol import CompletionRequest
from tunehouse.api.errors import _loc_to_param
from tunehouse.api.files.service import get_file_row
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.pagination import page
from tunehouse.api.responses import checks as responses
from tunehouse.api.responses import store as stored_responses
from tunehouse.api.responses.protocol import CreateResponseRequest, response_object
from tunehouse.api.state import AppState
from tunehouse.errors import APIError, InvalidRequest, ModelNotFound, NotFound
from tunehouse.jobs import batch as runner
from tunehouse.jobs.batch import (
    CANCELLING,
    CHAT,
    COMPLETIONS,
    ENDED,
    ENDPOINTS,
    FAILED,
    IN_PROGRESS,
    RESPONSES,
    VALIDATING,
)
from tunehouse.jobs.events import add_event
from tunehouse.jobs.queue import gpus_for
from tunehouse.store import files
from tunehouse.store import job_status as st
from tunehouse.store.tables import Batch, BatchOutput, Job, now
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped
from tunehouse.usage.quotas import check_concurrent_jobs, effective_quotas
from tunehouse.webhooks.outbox import BATCH_FAILED, enqueue_job_event

BATCH_FILE_PURPOSE = "batch"
MAX_REQUESTS = 50_000  # OpenAI's limit per batch
MAX_ERRORS = 1000  # problems reported of one file (the first ones)
LINE_FIELDS = ("custom_id", "method", "url", "body")
NOT_HERE = {
    "/v1/embeddings": "the Embeddings API is not available on this server yet",
}


# --------------------------------------------------------------------------------------------------
# Wire


def to_wire(session: Session, row: Batch, job: Job | None = None) -> WireBatch:
    counts = session.execute(
        select(
            BatchOutput.ok,
            func.count(),
            func.sum(BatchOutput.prompt_tokens),
            func.sum(BatchOutput.completion_tokens),
        )
        .where(BatchOutput.batch_id == row.id)
        .group_by(BatchOutput.ok)
    ).all()
    completed = sum(n for ok, n, _, _ in counts if ok)
    failed = sum(n for ok, n, _, _ in counts if not ok)
    prompt = sum(int(p or 0) for _, _, p, _ in counts)
    completion = sum(int(c or 0) for _, _, _, c in counts)
    status, errors, failed_at = row.status, row.errors, row.failed_at
    if job is None and status not in ENDED:
        job = session.scalar(select(Job).where(Job.id == row.id))
    if status not in ENDED and job is not None and job.status == st.FAILED:
        # The queue failed its job (its process kept dying): the batch failed with it.
        status, failed_at = FAILED, job.finished_at
        error = job.error or {}
        errors = [
            {
                "code": error.get("code") or "server_error",
                "message": error.get("message") or "The batch failed.",
                "param": error.get("param"),
                "line": None,
            }
        ]
    return WireBatch(
        id=row.id,
        endpoint=row.endpoint,
        model=row.model,
        errors=BatchErrors(data=[BatchError(**e) for e in errors]) if errors else None,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=status,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        in_progress_at=row.in_progress_at,
        expires_at=row.expires_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        request_counts=BatchRequestCounts(total=row.request_total, completed=completed, failed=failed),
        usage=BatchUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion),
        metadata=row.metadata_,
    )


def get_row(session: Session, *, principal: Principal, batch_id: str) -> Batch:
    row = session.scalar(scoped(Batch, principal).where(Batch.id == batch_id))
    if row is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return row


def get_batch(session: Session, *, principal: Principal, batch_id: str) -> WireBatch:
    return to_wire(session, get_row(session, principal=principal, batch_id=batch_id))


def list_batches(session: Session, *, principal: Principal, after: str | None, limit: int) -> BatchList:
    rows, has_more = page(session, scoped(Batch, principal), Batch, after=after, limit=limit, descending=True)
    data = [to_wire(session, r) for r in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def cancel_batch(session: Session, *, principal: Principal, batch_id: str) -> WireBatch:
    row = get_row(session, principal=principal, batch_id=batch_id)
    job = session.scalar(select(Job).where(Job.id == row.id))
    current = to_wire(session, row, job).status
    if current not in (VALIDATING, IN_PROGRESS, "finalizing"):
        raise InvalidRequest(
            f"Cannot cancel a batch with status '{current}'.", param="batch_id", code="invalid_request"
        )
    # The batch's job sees this within a second, stops, writes the lines done so far to the
    # output and error files and ends the batch `cancelled`.
    session.execute(
        update(Batch)
        .where(Batch.id == row.id, Batch.status.in_((VALIDATING, IN_PROGRESS)))
        .values(status=CANCELLING, cancelling_at=now())
    )
    add_event(session, row.id, "Batch cancel requested")
    session.commit()
    session.refresh(row)
    return to_wire(session, row)


# --------------------------------------------------------------------------------------------------
# Create


def _check_request(req: CreateBatchRequest) -> None:
    if req.endpoint in NOT_HERE:
        raise InvalidRequest(
            f"Invalid value for 'endpoint': '{req.endpoint}': {NOT_HERE[req.endpoint]}. This server runs "
            f"batches for '{CHAT}', '{COMPLETIONS}' and '{RESPONSES}'.",
            param="endpoint",
            code="invalid_value",
        )
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid value for 'endpoint': '{req.endpoint}'. Supported values are: '{CHAT}', '{COMPLETIONS}' "
            f"and '{RESPONSES}'.",
            param="endpoint",
            code="invalid_value",
        )
    if req.completion_window != "24h":
        raise InvalidRequest(
            f"Invalid value for 'completion_window': '{req.completion_window}'. Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )
    _check_metadata(req.metadata)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise InvalidRequest(
            "Invalid 'metadata': at most 16 pairs, keys up to 64 characters, values up to 512.",
            param="metadata",
            code="invalid_value",
        )


class _Problems:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.items) < MAX_ERRORS:
            self.items.append({"code": code, "message": message, "param": param, "line": line})


def _validation_problem(e: ValidationError) -> tuple[str, str, str | None]:
    """(code, message, param within the body) of a body's first validation error, as the
    endpoint's own 400 words it (api/errors.py)."""
    first = e.errors()[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    if first.get("type") == "extra_forbidden":
        return "unknown_parameter", f"Unrecognized request argument supplied: {param}", param
    msg = first.get("msg", "Invalid request")
    return (
        "invalid_value",
        (f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."),
        param,
    )


def _body_param(param: str | None) -> str:
    return f"body.{param}" if param else "body"


def _plan_entry(
    endpoint: str, body: dict, *, session: Session, principal: Principal
) -> tuple[str, dict[str, Any]]:
    """(model, the plan's request) of a body, through the endpoint's own checks (raises
    ValidationError or APIError)."""
    if endpoint == RESPONSES:
        return _response_entry(body, session=session, principal=principal)
    if endpoint == CHAT:
        req = ChatCompletionRequest.model_validate(body)
        _no_stream(req)
        if getattr(req, "store", False):
            # A batch's answers go to its output file; storing them too is not built.
            raise InvalidRequest(
                "Invalid value for 'store': a batch's answers are not stored as chat completions "
                "here; leave it out or false.",
                param="store",
                code="invalid_value",
            )
        spec = chat.check_supported(req)
        params = chat.sampling_params(req, spec)
        return req.model, {
            "messages": chat._messages(req),
            "tools": spec.tools if spec is not None and spec.in_prompt else None,
            "tool_names": spec.names if spec is not None and spec.parse else None,
            "parallel": getattr(spec, "parallel", True) if spec is not None else True,
            "legacy": getattr(req, "functions", None) is not None,
            "params": runner.plan_params(params),
        }
    req = CompletionRequest.model_validate(body)
    _no_stream(req)
    completions.check_supported(req)
    params = completions.sampling_params(req)
    return req.model, {
        "prompts": completions._raw_prompts(req),
        "echo": bool(req.echo),
        "params": runner.plan_params(params),
    }


def _response_entry(body: dict, *, session: Session, principal: Principal) -> tuple[str, dict[str, Any]]:
    """A /v1/responses line: checked by the endpoint's own code, its conversation (with the
    stored response a `previous_response_id` names) rendered as chat messages now, and the
    Response object it answers with, all but its output and usage. A batch's responses are not
    stored (`store` true is refused; unset, the answer says false) and run in the batch, not in
    the background."""
    req = CreateResponseRequest.model_validate(body)
    _no_stream(req)
    for name, value, why in (
        ("store", req.store, "a batch's answers go to its output file and are not stored as responses here"),
        ("background", req.background, "a batch's requests run in the batch"),
        ("truncation", req.truncation == "auto", "a batch's conversations are not truncated here"),
    ):
        if value:
            raise InvalidRequest(
                f"Invalid value for '{name}': {why}; leave it out or false.", param=name, code="invalid_value"
            )
    plan = responses.check_request(req)
    context = []
    if req.previous_response_id is not None:
        context = stored_responses.conversation(
            session, principal=principal, response_id=req.previous_response_id
        )
    messages = responses.to_messages(req.instructions, context + plan.input_items)
    spec = plan.spec
    shown = req.model_copy(update={"store": False})
    return req.model, {
        "messages": messages,
        "tools": spec.tools if spec is not None and spec.in_prompt else None,
        "tool_names": responses.tool_names(plan),
        "max_calls": plan.max_calls,
        "params": runner.plan_params(responses.sampling_params(req, plan)),
        "response": response_object(
            id="",
            created_at=0,
            status="in_progress",
            model=req.model,
            req=shown,
            tools=plan.tools,
            tool_choice=plan.tool_choice,
            text=plan.text,
        ),
    }


def _no_stream(req: BaseModel) -> None:
    if getattr(req, "stream", False):
        raise InvalidRequest(
            "Invalid value for 'stream': a batch's requests are not streamed; leave it out or false.",
            param="stream",
            code="invalid_value",
        )


def check_lines(
    state: AppState, session: Session, principal: Principal, endpoint: str, text: str
) -> tuple[list[dict], list[dict], str | None]:
    """(plan entries, problems, the batch's model) of an input file's text."""
    problems = _Problems()
    plan: list[dict] = []
    seen: dict[str, int] = {}
    model: str | None = None
    model_ok: dict[str, bool] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            problems.add(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(line, dict):
            problems.add(
                number,
                "invalid_request",
                "Each line must be a JSON object with custom_id, method, url and body.",
            )
            continue
        unknown = [k for k in line if k not in LINE_FIELDS]
        if unknown:
            problems.add(
                number,
                "unknown_parameter",
                f"Unrecognized request argument supplied: {unknown[0]}",
                unknown[0],
            )
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            code = "missing_required_parameter" if custom_id is None else "invalid_value"
            problems.add(number, code, "Each request needs a 'custom_id' (a non-empty string).", "custom_id")
        elif custom_id in seen:
            problems.add(
                number,
                "duplicate_custom_id",
                f"The custom_id for this request is a duplicate of another request (line {seen[custom_id]}). "
                "The custom_id parameter must be unique for each request in a batch.",
                "custom_id",
            )
        else:
            seen[custom_id] = number
        if line.get("method") != "POST":
            problems.add(number, "invalid_method", "The method of each request must be 'POST'.", "method")
        if line.get("url") != endpoint:
            problems.add(
                number,
                "invalid_url",
                f"The URL provided for this request ({line.get('url')!r}) does not match the batch endpoint '{endpoint}'.",
                "url",
            )
        body = line.get("body")
        if not isinstance(body, dict):
            problems.add(number, "invalid_request", "Each request needs a 'body' (a JSON object).", "body")
            continue
        try:
            name, entry = _plan_entry(endpoint, body, session=session, principal=principal)
        except ValidationError as e:
            code, message, param = _validation_problem(e)
            problems.add(number, code, message, _body_param(param))
            continue
        except APIError as e:
            problems.add(number, e.code or "invalid_request", e.message, _body_param(e.param))
            continue
        if model is None:
            model = name
        elif name != model:
            problems.add(
                number,
                "mismatched_model",
                f"The model '{name}' differs from the batch's model '{model}' (line {min(seen.values(), default=number)}): "
                "all requests of a batch must use the same model.",
                "body.model",
            )
            continue
        if name not in model_ok:
            try:
                resolve_for_inference(state, session, principal=principal, model=name)
                model_ok[name] = True
            except ModelNotFound:
                model_ok[name] = False
        if not model_ok[name]:
            problems.add(
                number,
                "model_not_found",
                f"The model '{name}' does not exist or you do not have access to it.",
                "body.model",
            )
            continue
        plan.append({"line": number, "custom_id": custom_id, **entry})
    if not plan and not problems.items:
        problems.add(1, "empty_file", "The input file has no requests.", None)
    if len(plan) + len(problems.items) > MAX_REQUESTS:
        problems.add(
            MAX_REQUESTS + 1, "too_many_requests", f"A batch holds at most {MAX_REQUESTS:,} requests."
        )
    return plan, problems.items, model


def create_batch(
    state: AppState, session: Session, *, principal: Principal, req: CreateBatchRequest
) -> WireBatch:
    _check_request(req)
    try:
        file_row = get_file_row(session, principal=principal, file_id=req.input_file_id)
    except NotFound:
        raise NotFound(f"No such File object: {req.input_file_id}", param="input_file_id") from None
    if file_row.purpose != BATCH_FILE_PURPOSE:
        raise InvalidRequest(
            f"File {req.input_file_id} has purpose '{file_row.purpose}'; a batch reads a file uploaded "
            f"with purpose '{BATCH_FILE_PURPOSE}'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    path = files.file_path(state.files, file_row)
    if not path.exists():
        raise NotFound(f"No such File object: {req.input_file_id}", param="input_file_id")
    text = path.read_text(encoding="utf-8", errors="replace")
    plan, problems, model = check_lines(state, session, principal, req.endpoint, text)

    batch_id = ids.batch_id()
    created = now()
    row = Batch(
        id=batch_id,
        organization_id=principal.organization_id,
        project_id=principal.owning_project_id,
        key_id=principal.key_id,
        endpoint=req.endpoint,
        model=model,
        input_file_id=req.input_file_id,
        completion_window=req.completion_window,
        output_expires_after=req.output_expires_after.seconds if req.output_expires_after else None,
        request_total=len(plan) if not problems else 0,
        metadata_=req.metadata,
        created_at=created,
    )
    if problems:
        # OpenAI's validation failure: the batch exists, failed, with every problem located.
        row.status, row.failed_at, row.errors = FAILED, created, problems
        session.add(row)
        session.flush()
        enqueue_job_event(
            session, job_id=batch_id, event_type=BATCH_FAILED, organization_id=row.organization_id
        )
        session.commit()
        return to_wire(session, row)

    # A batch is a job: it counts against the organization's concurrent jobs, as an eval run does.
    check_concurrent_jobs(
        effective_quotas(state.settings, session, principal.organization_id),
        session,
        principal.organization_id,
    )
    key = runner.plan_key(principal.organization_id, batch_id)
    state.files.write_bytes(key, "".join(json.dumps(e) + "\n" for e in plan).encode())
    ref = resolve_for_inference(state, session, principal=principal, model=model)
    model = row.model = ref.name  # an alias's model: the worker runs (and answers with) the model itself
    row.status, row.plan_path = VALIDATING, key
    row.expires_at = created + runner.WINDOW_SECONDS[req.completion_window]
    # The job that runs it: the queue's columns; those of fine-tuning hold neutral values.
    job = Job(
        id=batch_id,
        kind=runner.BatchKind.name,
        organization_id=row.organization_id,
        project_id=row.project_id,
        model=model,
        base_model=model,
        training_file=req.input_file_id,
        seed=0,
        method={"type": runner.BatchKind.name},
        status=st.VALIDATING,
        result_files=[],
        gpus_required=gpus_for(ref.base_path, options=None, gpu_min_params=state.settings.gpu_min_params),
    )
    try:
        session.add(row)
        session.add(job)
        session.flush()
        add_event(session, batch_id, f"Created batch {batch_id} ({len(plan)} requests to {req.endpoint})")
        session.commit()
    except BaseException:
        session.rollback()
        state.files.delete(key)
        raise
    return to_wire(session, row, job)
