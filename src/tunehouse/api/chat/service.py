"""Chat completions: request → engine → OpenAI's chat.completion or its SSE chunks.

Running the request (the engine's thread, streaming, metering, a client that leaves) is
`api/serving.py`'s, shared with legacy completions; this module holds what is chat's own: the
checks pydantic cannot make, the chat template and tools, and the wire objects.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from tunehouse import ids
from tunehouse.api import serving
from tunehouse.api.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    FunctionCall,
    ToolCall,
)
from tunehouse.api.chat.protocol import TokenLogprob as WireTokenLogprob
from tunehouse.api.serving import REQUEST_ERRORS, engine_error
from tunehouse.errors import InvalidRequest
from tunehouse.inference import tools as tool_calls
from tunehouse.inference.constrained import InvalidResponseFormat, validate_response_format
from tunehouse.inference.engine import Delta, ModelRef, PartialChoice, SamplingParams, TokenLogprob


def check_supported(req: ChatCompletionRequest) -> tool_calls.ToolSpec | None:
    """Validate what pydantic cannot; returns the request's function-calling spec."""
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'.",
            param="top_logprobs",
            code="invalid_value",
        )
    serving.logit_bias(req.logit_bias)
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


def sampling_params(req: ChatCompletionRequest, spec: tool_calls.ToolSpec | None) -> SamplingParams:
    forced = spec is not None and spec.choice in ("required", "named")
    return SamplingParams(
        **serving.common_sampling(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
        response_format=None if forced else req.response_format,
        grammar=tool_calls.grammar(spec) if forced else None,
    )


def _messages(req: ChatCompletionRequest) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in req.messages]


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


async def _start(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> tuple[SamplingParams, serving.Generation]:
    params = sampling_params(req, spec)
    prompt = await _prompt(engine, model, req, spec)
    gen = await serving.Generation.start(
        state, principal, engine, model, [prompt], params, meter_as=req.model, prompt_param="messages"
    )
    return params, gen


async def complete(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> ChatCompletion:
    params, gen = await _start(state, principal, engine, model, req, spec)
    parts = [PartialChoice(i) for i in range(params.n)]
    usage = await serving.collect(gen, lambda _, item: parts[item.index].add(item))

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
        usage=serving.usage_of(usage),
    )


async def open_stream(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> AsyncIterator[str]:
    """Validates and queues before the first byte (so errors get a proper status), then yields SSE lines."""
    params, gen = await _start(state, principal, engine, model, req, spec)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(gen, model.name, params, spec, include_usage=include_usage)


def _sse(
    gen: serving.Generation, model_name: str, params: SamplingParams, spec, *, include_usage: bool
) -> AsyncIterator[str]:
    base = {"id": ids.completion_id(), "created": int(time.time()), "model": model_name}
    usage_field = {"usage": None} if include_usage else {}
    parsers = (
        {i: tool_calls.ToolCallParser(spec.names) for i in range(params.n)} if spec and spec.parse else {}
    )

    def chunk(choices: list[ChunkChoice], **extra) -> str:
        body = ChatCompletionChunk(**base, choices=choices, **extra)
        return serving.sse(body, exclude=None if include_usage else {"usage"})

    def pieces(_: int, item: Delta) -> list[str]:
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

    opening = [
        chunk(
            [ChunkChoice(index=i, delta={"role": "assistant", "content": "", "refusal": None})], **usage_field
        )
        for i in range(params.n)
    ]
    return serving.stream(
        gen,
        opening=opening,
        chunks=pieces,
        usage_chunk=(lambda u: chunk([], usage=serving.usage_of(u))) if include_usage else None,
    )
