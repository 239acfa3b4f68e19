"""Chat completions: request → engine → OpenAI's chat.completion or its SSE chunks.

The engine runs requests on its own scheduler thread and reports through a callback; `events`
below turns that into an async iterator, so a waiting request holds no worker thread and the API
stays responsive under load. Leaving the iterator early (the client closed its stream) cancels the
request, which frees its batch slots at the engine's next step. Every finished request, streamed or
not, completed or abandoned, is metered once with the tokens it used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from tunehouse import ids
from tunehouse.api.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FunctionCall,
    ToolCall,
)
from tunehouse.api.chat.protocol import TokenLogprob as WireTokenLogprob
from tunehouse.api.errors import error_body
from tunehouse.errors import APIError, InvalidRequest, ModelNotFound
from tunehouse.inference import tools as tool_calls
from tunehouse.inference.constrained import InvalidResponseFormat, validate_response_format
from tunehouse.inference.engine import (
    ContextLengthExceeded,
    Delta,
    InvalidLogitBias,
    ModelRef,
    PartialChoice,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from tunehouse.usage import metering

log = logging.getLogger(__name__)


def check_supported(req: ChatCompletionRequest) -> tool_calls.ToolSpec | None:
    """Validate what pydantic cannot; returns the request's function-calling spec."""
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'.",
            param="top_logprobs",
            code="invalid_value",
        )
    logit_bias(req.logit_bias)
    # text, json_object and json_schema (enforced by constrained decoding); a malformed one, or a
    # schema that does not compile, is a 400 before any generation.
    try:
        validate_response_format(req.response_format)
    except InvalidResponseFormat as e:
        raise InvalidRequest(str(e), param="response_format", code="invalid_value") from None
    try:
        return tool_calls.validate(req.tools, req.tool_choice, req.parallel_tool_calls)
    except tool_calls.InvalidTools as e:
        raise InvalidRequest(str(e), param=e.param, code="invalid_value") from None


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


def sampling_params(req: ChatCompletionRequest, spec: tool_calls.ToolSpec | None) -> SamplingParams:
    forced = spec is not None and spec.choice in ("required", "named")
    return SamplingParams(
        **common_sampling(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
        response_format=None if forced else req.response_format,
        grammar=tool_calls.grammar(spec) if forced else None,
    )


def _messages(req: ChatCompletionRequest) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in req.messages]


def engine_error(e: Exception, model: ModelRef, *, prompt_param: str = "messages") -> APIError:
    if isinstance(e, InvalidResponseFormat):
        return InvalidRequest(str(e), param="response_format", code="invalid_value")
    if isinstance(e, InvalidLogitBias):
        return InvalidRequest(str(e), param="logit_bias", code="invalid_value")
    if isinstance(e, ContextLengthExceeded):
        return InvalidRequest(str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, FileNotFoundError):  # the weights were deleted under us
        return ModelNotFound(model.name)
    return InvalidRequest(str(e))


REQUEST_ERRORS = (ContextLengthExceeded, FileNotFoundError, ValueError)


# --------------------------------------------------------------------------------------------------
# Running a request on the engine without holding a thread


@dataclass
class Running:
    """A submitted request: its events as an async iterator, and its handle (to cancel, to count)."""

    handle: object
    queue: asyncio.Queue
    prompt_tokens: int

    async def events(self) -> AsyncIterator[Delta | Usage]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Usage):
                    return
        finally:
            self.handle.cancel()  # a no-op once finished; frees the slots of an abandoned stream


async def submit(
    engine,
    model: ModelRef,
    prompt: list[int],
    params: SamplingParams,
    *,
    prompt_param: str = "messages",
    queue: asyncio.Queue | None = None,
    tag: int | None = None,
) -> Running:
    """Validate and queue (errors here are a 400/404 before any byte is sent). Several requests may
    share one `queue`: each then puts `(tag, event)` pairs."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = queue if queue is not None else asyncio.Queue()

    def on_event(item) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(q.put_nowait, item if tag is None else (tag, item))

    try:
        handle = await run_in_threadpool(engine.submit, model, prompt, params, on_event)
    except REQUEST_ERRORS as e:
        raise engine_error(e, model, prompt_param=prompt_param) from None
    return Running(handle=handle, queue=q, prompt_tokens=len(prompt))


def meter(state, principal, model_name: str, prompt_tokens: int, completion_tokens: int) -> None:
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


def meter_later(state, principal, model_name: str, *runs: Running) -> None:
    """Meter from a worker thread without awaiting: this runs in `finally` blocks of cancelled
    streams, where an await would be cancelled again. Several runs (one answer's prompts) are
    metered as one request."""
    prompt = sum(r.prompt_tokens for r in runs)
    tokens = sum(r.handle.completion_tokens for r in runs)
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, meter, state, principal, model_name, prompt, tokens)


def usage_of(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def stream_error(e: Exception) -> str:
    """The SSE line for a failure mid-stream: headers are sent already, so the error travels in the
    stream, as OpenAI does it. Call it from an `except` block (it logs the traceback)."""
    if isinstance(e, APIError):
        return f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
    log.exception("generation failed mid-stream")
    return f"data: {json.dumps(error_body('The server had an error while generating.', 'server_error'))}\n\n"


def wire_logprobs(entries: list[TokenLogprob] | None) -> list[WireTokenLogprob]:
    return [
        WireTokenLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=e.bytes,
            top_logprobs=[{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs],
        )
        for e in entries or []
    ]


# --------------------------------------------------------------------------------------------------
# Chat


async def _prompt(engine, model: ModelRef, req: ChatCompletionRequest, spec) -> list[int]:
    tools = spec.tools if spec is not None and spec.in_prompt else None
    try:
        return await run_in_threadpool(engine.encode_chat, model, _messages(req), tools=tools)
    except REQUEST_ERRORS as e:
        raise engine_error(e, model) from None


async def complete(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> ChatCompletion:
    params = sampling_params(req, spec)
    running = await submit(engine, model, await _prompt(engine, model, req, spec), params)
    parts = [PartialChoice(i) for i in range(params.n)]
    usage = None
    try:
        async for item in running.events():
            if isinstance(item, Usage):
                usage = item
            else:
                parts[item.index].add(item)
    except REQUEST_ERRORS as e:
        raise engine_error(e, model) from None
    finally:
        if usage is None:  # failed or abandoned: meter what was generated
            meter_later(state, principal, req.model, running)
    await run_in_threadpool(meter, state, principal, req.model, usage.prompt_tokens, usage.completion_tokens)

    choices = []
    for part in parts:
        text, reason, calls = part.text, part.finish_reason or "length", []
        if spec is not None and spec.parse:
            text, calls = tool_calls.parse(text, spec.names)
            if calls and reason == "stop":
                reason = "tool_calls"
        message = AssistantMessage(
            content=text,
            tool_calls=[
                ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                for c in calls
            ]
            or None,
        )
        lp = ChoiceLogprobs(content=wire_logprobs(part.logprobs)) if params.logprobs else None
        choices.append(ChatChoice(index=part.index, message=message, logprobs=lp, finish_reason=reason))
    return ChatCompletion(
        id=ids.completion_id(),
        created=int(time.time()),
        model=model.name,
        choices=choices,
        usage=usage_of(usage.prompt_tokens, usage.completion_tokens),
    )


async def open_stream(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> AsyncIterator[str]:
    """Validates and queues before the first byte (so errors get a proper status), then yields SSE lines."""
    params = sampling_params(req, spec)
    running = await submit(engine, model, await _prompt(engine, model, req, spec), params)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(state, principal, req, running, model.name, params, spec, include_usage=include_usage)


async def _sse(
    state,
    principal,
    req: ChatCompletionRequest,
    running: Running,
    model_name: str,
    params: SamplingParams,
    spec,
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    base = {"id": ids.completion_id(), "created": int(time.time()), "model": model_name}
    usage_field = {"usage": None} if include_usage else {}
    parsers = (
        {i: tool_calls.ToolCallParser(spec.names) for i in range(params.n)} if spec and spec.parse else {}
    )

    def chunk(choices: list[ChunkChoice], **extra) -> str:
        body = ChatCompletionChunk(**base, choices=choices, **extra)
        exclude = None if include_usage else {"usage"}
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

    def pieces(item: Delta) -> list[str]:
        """The chunks of one engine delta: content, then tool-call pieces, then the finish."""
        out = []
        lp = ChoiceLogprobs(content=wire_logprobs(item.logprobs)) if item.logprobs else None
        text, calls = item.text, []
        parser = parsers.get(item.index)
        if parser is not None:
            text, calls = parser.feed(item.text, final=item.finish_reason is not None)
        if text or lp is not None:
            out.append(
                chunk([ChunkChoice(index=item.index, delta={"content": text}, logprobs=lp)], **usage_field)
            )
        for call in calls:
            out.append(
                chunk([ChunkChoice(index=item.index, delta={"tool_calls": [call.wire()]})], **usage_field)
            )
        if item.finish_reason:
            reason = item.finish_reason
            if parser is not None and parser.calls and reason == "stop":
                reason = "tool_calls"
            out.append(chunk([ChunkChoice(index=item.index, delta={}, finish_reason=reason)], **usage_field))
        return out

    metered = False
    try:
        for i in range(params.n):
            yield chunk(
                [ChunkChoice(index=i, delta={"role": "assistant", "content": "", "refusal": None})],
                **usage_field,
            )
        async for item in running.events():
            if isinstance(item, Delta):
                for line in pieces(item):
                    yield line
            elif isinstance(item, Usage):
                metered = True
                await run_in_threadpool(
                    meter, state, principal, req.model, item.prompt_tokens, item.completion_tokens
                )
                if include_usage:
                    yield chunk([], usage=usage_of(item.prompt_tokens, item.completion_tokens))
    except Exception as e:
        yield stream_error(e)
        return
    finally:
        if not metered:  # the client went away (or the engine failed): meter what was generated
            running.handle.cancel()
            meter_later(state, principal, req.model, running)
    yield "data: [DONE]\n\n"
