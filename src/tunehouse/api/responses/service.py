"""The Responses API: a /v1/responses request → the same generation call as chat completions
(`api/chat/service.start_chat`) → OpenAI's Response object, its stream of events, or a background
run that `retrieve` polls.

- `checks.py` validates the request and turns it into a `Plan` in chat's terms; the conversation
  is the previous response's (its input items and output, `previous_response_id`) followed by this
  request's input, rendered as chat messages with `instructions` first as a system message.
- `inference/output_items.OutputBuilder` turns the engine's deltas into output items (a message
  with an `output_text` part; `function_call` items parsed from the model's tool-call blocks) and,
  for a stream, into OpenAI's events in order. A non-streamed response is built by the same code,
  so both agree (and batches over /v1/responses use it too).
- Stored responses (`store`, default true; every background one) are `store.py`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from tunehouse import ids
from tunehouse.api import serving
from tunehouse.api.chat import service as chat
from tunehouse.api.responses import store
from tunehouse.api.responses.checks import Plan, check_request, sampling_params, to_messages, tool_names
from tunehouse.api.responses.protocol import CreateResponseRequest, response_object
from tunehouse.errors import APIError, InvalidRequest
from tunehouse.inference import output_items
from tunehouse.inference.engine import Delta, ModelRef, SamplingParams
from tunehouse.inference.output_items import OutputBuilder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Running a response


@dataclass
class Run:
    """One response being made: its request, plan, conversation, and the Response object's parts."""

    state: Any
    principal: Any
    engine: Any
    model: ModelRef
    req: CreateResponseRequest
    plan: Plan
    context: list[dict]  # conversation items before this request's input
    id: str = field(default_factory=ids.response_id)
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def items(self) -> list[dict]:
        return self.context + self.plan.input_items

    def response(self, status: str, **kw) -> dict:
        return response_object(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.model.name,
            req=self.req,
            tools=self.plan.tools,
            tool_choice=self.plan.tool_choice,
            text=self.plan.text,
            **kw,
        )

    def params(self) -> SamplingParams:
        return sampling_params(self.req, self.plan)

    async def start(self) -> serving.Generation:
        """Queue the generation (a 400 before any byte is sent when it cannot run). With
        `truncation: auto`, a conversation too long for the context loses its oldest items until
        it fits (instructions stay), as OpenAI truncates."""
        items = self.items
        while True:
            messages = to_messages(self.req.instructions, items)
            try:
                return await chat.start_chat(
                    self.state,
                    self.principal,
                    self.engine,
                    self.model,
                    messages,
                    self.params(),
                    self.plan.spec,
                    meter_as=self.req.model,
                    prompt_param="input",
                )
            except InvalidRequest as e:
                if e.code != "context_length_exceeded" or self.req.truncation != "auto" or len(items) <= 1:
                    raise
                items = items[1:]
                while items and items[0]["type"] == "function_call_output":
                    items = items[1:]  # an output without its call would be refused
                if not items:
                    raise

    def finished(self, builder: OutputBuilder, usage) -> dict:
        return output_items.finish(
            self.response("in_progress"),
            builder,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            now=int(time.time()),
        )

    def builder(self) -> OutputBuilder:
        return OutputBuilder(
            tool_names(self.plan), max_calls=self.plan.max_calls, logprobs=self.plan.logprobs
        )

    def save(self, response: dict, *, lease_until: float | None = None) -> None:
        with self.state.db.transaction() as s:
            store.save(
                s,
                principal=self.principal,
                response=response,
                input_items=self.items,
                lease_until=lease_until,
            )


async def prepare(state, session, principal, engine, model: ModelRef, req: CreateResponseRequest) -> Run:
    plan = check_request(req)
    context = []
    if req.previous_response_id is not None:
        context = await run_in_threadpool(
            store.conversation, session, principal=principal, response_id=req.previous_response_id
        )
    run = Run(
        state=state, principal=principal, engine=engine, model=model, req=req, plan=plan, context=context
    )
    to_messages(req.instructions, run.items)  # function outputs must answer calls: a 400 before anything runs
    return run


async def complete(run: Run) -> dict:
    gen = await run.start()
    builder = run.builder()
    usage = await serving.collect(gen, lambda _, item: builder.feed(item))
    builder.finish()
    response = run.finished(builder, usage)
    if run.req.store is not False:
        await run_in_threadpool(run.save, response)
    return response


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def open_stream(run: Run) -> AsyncIterator[str]:
    """Queues the generation before the first byte (errors get a proper status), then yields
    OpenAI's events: response.created, response.in_progress, the output items' events,
    response.completed (or response.incomplete), each with its sequence_number. The response is
    stored (unless `store: false`) before response.completed is sent."""
    gen = await run.start()
    return _events(run, gen)


async def _events(run: Run, gen: serving.Generation) -> AsyncIterator[str]:
    seq = 0

    def number(event: dict) -> str:
        nonlocal seq
        out = {
            "type": event["type"],
            "sequence_number": seq,
            **{k: v for k, v in event.items() if k != "type"},
        }
        seq += 1
        return _sse(out)

    builder = run.builder()
    try:
        yield number({"type": "response.created", "response": run.response("in_progress")})
        yield number({"type": "response.in_progress", "response": run.response("in_progress")})
        async for _, item in gen.events():
            if isinstance(item, Delta):
                for event in builder.feed(item):
                    yield number(event)
        await gen.meter()
        for event in builder.finish():
            yield number(event)
        response = run.finished(builder, gen.usage)
        if run.req.store is not False:
            await run_in_threadpool(run.save, response)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield number({"type": kind, "response": response})
    except Exception as e:
        if isinstance(e, APIError):
            message, code = e.message, "server_error"
        else:
            log.exception("response %s failed mid-stream", run.id)
            message, code = "The server had an error while generating.", "server_error"
        failed = run.response("failed", output=builder.output(), error={"code": code, "message": message})
        yield number({"type": "response.failed", "response": failed})
    finally:
        gen.close()


# --------------------------------------------------------------------------------------------------
# Background responses: run in this server's event loop, their row updated when they end


async def start_background(run: Run, registry: dict[str, asyncio.Task]) -> dict:
    """Queue the generation (a 400 here when it cannot run), store the response as in progress,
    and finish it in a task; `retrieve` reads the stored row, `cancel` cancels the task."""
    gen = await run.start()
    response = run.response("in_progress")
    lease = run.state.settings.lease_seconds
    try:
        await run_in_threadpool(lambda: run.save(response, lease_until=time.time() + lease))
    except BaseException:
        gen.close()
        raise
    task = asyncio.create_task(_background(run, gen))
    registry[run.id] = task
    task.add_done_callback(lambda _: registry.pop(run.id, None))
    return response


async def _background(run: Run, gen: serving.Generation) -> None:
    builder = run.builder()
    heartbeat = asyncio.create_task(_renew_lease(run))
    try:
        usage = await serving.collect(gen, lambda _, item: builder.feed(item))
        builder.finish()
        response = run.finished(builder, usage)
    except asyncio.CancelledError:
        builder.finish()
        response = run.response("cancelled", output=builder.output())
        await asyncio.shield(_update(run, response))
        raise
    except Exception as e:
        if not isinstance(e, APIError):
            log.exception("background response %s failed", run.id)
        message = e.message if isinstance(e, APIError) else "The server had an error while generating."
        response = run.response(
            "failed", output=builder.output(), error={"code": "server_error", "message": message}
        )
    finally:
        heartbeat.cancel()
    await _update(run, response)


async def _renew_lease(run: Run) -> None:
    """Renew the row's lease (settings.lease_seconds, as job workers renew theirs) while this
    process generates: if the process dies, the lease lapses and the next reader fails the
    response instead of it staying in progress for ever."""
    lease = run.state.settings.lease_seconds
    while True:
        await asyncio.sleep(lease / 3)
        try:
            await run_in_threadpool(_renew_row, run, time.time() + lease)
        except Exception:
            log.exception("could not renew the lease of background response %s", run.id)


def _renew_row(run: Run, until: float) -> None:
    with run.state.db.transaction() as s:
        store.renew(s, response_id=run.id, lease_until=until)


async def _update(run: Run, response: dict) -> None:
    try:
        await run_in_threadpool(_update_row, run, response)
    except Exception:
        log.exception("could not record the end of background response %s", run.id)


def _update_row(run: Run, response: dict) -> None:
    with run.state.db.transaction() as s:
        store.finish(s, response_id=run.id, response=response)


async def cancel(state, session, principal, response_id: str, registry: dict[str, asyncio.Task]) -> dict:
    """Cancel a background response: its generation stops, its output so far is kept, its status
    is `cancelled`. Cancelling a cancelled response answers it again; a finished one is a 400."""
    row = await run_in_threadpool(store.get_row, session, principal=principal, response_id=response_id)
    if not row.response.get("background"):
        raise InvalidRequest(
            "Only responses created with background=true can be cancelled.",
            param="response_id",
            code="invalid_value",
        )
    if row.status in ("queued", "in_progress"):
        task = registry.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)
        await run_in_threadpool(_mark_cancelled, state, principal, response_id)
        session.expire_all()
        row = await run_in_threadpool(store.get_row, session, principal=principal, response_id=response_id)
    elif row.status != "cancelled":
        raise InvalidRequest(
            f"Cannot cancel a response with status '{row.status}'.", param="response_id", code="invalid_value"
        )
    return row.response


def _mark_cancelled(state, principal, response_id: str) -> None:
    """For a response running in another server process (or one that died): the row says
    cancelled, and that process, when its generation ends, leaves it so."""
    with state.db.transaction() as s:
        row = store.get_row(s, principal=principal, response_id=response_id)
        if row.status in ("queued", "in_progress"):
            store.finish(s, response_id=response_id, response={**row.response, "status": "cancelled"})
