"""Serving glue shared by /v1/chat/completions and /v1/completions (and what /v1/responses would
reuse): run an API request's prompts on the inference engine, stream or collect what they produce,
meter it, and frame it as server-sent events. Each endpoint keeps only its wire format.

- `Generation.start(...)` validates and queues one API request's prompts, one engine request per
  prompt, all reporting on one asyncio queue: the engine runs them on its own scheduler thread
  and calls back, so a waiting request holds no worker thread and the API stays responsive under
  load. An error here is a 400/404 before any byte is sent.
- `gen.events()` yields (prompt index, `Delta` | `Usage`) as they come. Leaving it early (the
  client closed its stream) cancels every engine request, which frees their batch slots at the
  engine's next step.
- `collect(gen, on_delta)` runs a non-streamed request to its end; `stream(gen, ...)` gives the SSE
  lines of a streamed one: the opening chunks, each delta's chunks, the usage chunk, `[DONE]`, or
  an error event once headers are sent.

Every request, streamed or not, completed, failed or abandoned by its client, is metered exactly
once with the tokens its engine requests produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tunehouse.api.chat.protocol import CompletionUsage
from tunehouse.api.errors import error_body
from tunehouse.errors import APIError, InvalidRequest, ModelNotFound
from tunehouse.inference.constrained import InvalidResponseFormat
from tunehouse.inference.engine import (
    ContextLengthExceeded,
    Delta,
    InvalidLogitBias,
    ModelRef,
    SamplingParams,
    Usage,
)
from tunehouse.tenancy.auth import Principal
from tunehouse.usage import metering

log = logging.getLogger(__name__)

# What the engine raises for a request it cannot run (a 400 or 404, never a 500).
REQUEST_ERRORS = (ContextLengthExceeded, FileNotFoundError, ValueError)
DONE = "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------
# Request parameters both endpoints take


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as JSON object keys) → a bias from -100 to 100."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or str(token) != key.strip():
            raise InvalidRequest(
                f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100 <= value <= 100:
            raise InvalidRequest(
                f"Invalid value in 'logit_bias' for {key}: {value}. Biases must be between -100 and 100.",
                param="logit_bias",
                code="invalid_value",
            )
        out[token] = float(value)
    return out


def common_sampling(req) -> dict:
    """The sampling arguments chat and legacy completions take alike, with OpenAI's defaults."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "n": req.n or 1,
        "stop": [s for s in stop if s],
        "seed": req.seed,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": logit_bias(req.logit_bias),
    }


def engine_error(e: Exception, model: ModelRef, *, prompt_param: str = "messages") -> APIError:
    """The OpenAI error for an engine refusing a request (REQUEST_ERRORS and malformed formats)."""
    if isinstance(e, InvalidResponseFormat):
        return InvalidRequest(str(e), param="response_format", code="invalid_value")
    if isinstance(e, InvalidLogitBias):
        return InvalidRequest(str(e), param="logit_bias", code="invalid_value")
    if isinstance(e, ContextLengthExceeded):
        return InvalidRequest(str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, FileNotFoundError):  # the weights were deleted under us
        return ModelNotFound(model.name)
    return InvalidRequest(str(e))


def usage_of(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


# --------------------------------------------------------------------------------------------------
# Running an API request's prompts on the engine


def _record(state, principal: Principal, model_name: str, prompt_tokens: int, completion_tokens: int) -> None:
    try:
        metering.record_inference(
            state,
            principal,
            model=model_name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    except Exception:  # metering must never turn a served answer into an error
        log.exception("could not record usage for %s", model_name)


@dataclass
class Generation:
    """One API request's engine requests (one per prompt), their events on one queue, metered once
    under `meter_as` (the model name as the client sent it)."""

    state: Any  # api.state.AppState: its settings and database record the usage
    principal: Principal
    model: ModelRef
    meter_as: str
    prompt_param: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    handles: list = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=lambda: Usage(prompt_tokens=0, completion_tokens=0))
    metered: bool = False

    @classmethod
    async def start(
        cls,
        state,
        principal: Principal,
        engine,
        model: ModelRef,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        meter_as: str,
        prompt_param: str = "messages",
    ) -> Generation:
        """Validate and queue every prompt (errors here are a 400/404 before any byte is sent);
        if one is refused, those already queued are cancelled."""
        gen = cls(state=state, principal=principal, model=model, meter_as=meter_as, prompt_param=prompt_param)
        loop = asyncio.get_running_loop()
        try:
            for k, prompt in enumerate(prompts):

                def on_event(item, k=k) -> None:  # called on the engine's thread
                    loop.call_soon_threadsafe(gen.queue.put_nowait, (k, item))

                handle = await run_in_threadpool(engine.submit, model, prompt, params, on_event)
                gen.handles.append(handle)
                gen.prompt_lengths.append(len(prompt))
        except REQUEST_ERRORS as e:
            gen.cancel()
            raise engine_error(e, model, prompt_param=prompt_param) from None
        except BaseException:
            gen.cancel()
            raise
        return gen

    async def events(self) -> AsyncIterator[tuple[int, Delta | Usage]]:
        """(prompt index, event) until every prompt's `Usage` came; leaving early cancels them all."""
        remaining = len(self.handles)
        try:
            while remaining:
                k, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Usage):
                    remaining -= 1
                    self.usage = Usage(
                        prompt_tokens=self.usage.prompt_tokens + item.prompt_tokens,
                        completion_tokens=self.usage.completion_tokens + item.completion_tokens,
                    )
                yield k, item
        finally:
            self.cancel()  # a no-op once finished; frees the slots of an abandoned stream

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def meter(self) -> None:
        """Record the finished request's usage (once)."""
        if not self.metered:
            self.metered = True
            await run_in_threadpool(
                _record,
                self.state,
                self.principal,
                self.meter_as,
                self.usage.prompt_tokens,
                self.usage.completion_tokens,
            )

    def close(self) -> None:
        """Cancel what still runs and, unless metered already (a failed or abandoned request),
        meter what was generated. Never awaits: this runs in `finally` blocks of cancelled
        streams, where an await would be cancelled again, so the record is made on a worker thread."""
        self.cancel()
        if self.metered:
            return
        self.metered = True
        prompt = sum(self.prompt_lengths)
        tokens = sum(h.completion_tokens for h in self.handles)
        asyncio.get_running_loop().run_in_executor(
            None, _record, self.state, self.principal, self.meter_as, prompt, tokens
        )


async def collect(gen: Generation, on_delta: Callable[[int, Delta], None]) -> Usage:
    """Run a non-streamed request to its end, handing each (prompt index, delta) to `on_delta`;
    returns the tokens used, metered."""
    finished = False
    try:
        async for k, item in gen.events():
            if isinstance(item, Delta):
                on_delta(k, item)
        finished = True
    except REQUEST_ERRORS as e:
        raise engine_error(e, gen.model, prompt_param=gen.prompt_param) from None
    finally:
        if not finished:  # failed or abandoned: meter what was generated
            gen.close()
    await gen.meter()
    return gen.usage


# --------------------------------------------------------------------------------------------------
# Server-sent events


def sse(body: BaseModel, *, exclude: set[str] | None = None) -> str:
    """One SSE event holding `body` as JSON."""
    return f"data: {body.model_dump_json(exclude=exclude)}\n\n"


def stream_error(e: Exception) -> str:
    """The SSE line for a failure mid-stream: headers are sent already, so the error travels in the
    stream, as OpenAI does it. Call it from an `except` block (it logs the traceback)."""
    if isinstance(e, APIError):
        return f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
    log.exception("generation failed mid-stream")
    return f"data: {json.dumps(error_body('The server had an error while generating.', 'server_error'))}\n\n"


async def stream(
    gen: Generation,
    *,
    chunks: Callable[[int, Delta], Iterable[str]],
    opening: Iterable[str] = (),
    usage_chunk: Callable[[Usage], str] | None = None,
) -> AsyncIterator[str]:
    """The SSE lines of a streamed request: `opening`, then `chunks(prompt index, delta)` for each
    delta, then (metered first) `usage_chunk(usage)` when given, then `[DONE]`."""
    try:
        for line in opening:
            yield line
        async for k, item in gen.events():
            if isinstance(item, Delta):
                for line in chunks(k, item):
                    yield line
        await gen.meter()
        if usage_chunk is not None:
            yield usage_chunk(gen.usage)
    except Exception as e:
        yield stream_error(e)
        return
    finally:
        gen.close()  # the client went away (or the engine failed): cancel, meter what was generated
    yield DONE


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; proxies are told not to buffer them."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
