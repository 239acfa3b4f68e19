"""Chat completions: request → engine → OpenAI's chat.completion or its SSE chunks.

Running the request (the engine's thread, streaming, metering, a client that leaves) is
`api/serving.py`'s, shared with legacy completions; this module holds what is chat's own: the
checks pydantic cannot make, the chat template and tools, and the wire objects.
"""

from __future__ import annotations

import logging
import re
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

log = logging.getLogger(__name__)


def _unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"Unsupported parameter: '{param}' {what}", param=param, code="unsupported_parameter"
    )


def check_prompt_cache(retention: str | None, options: dict | None) -> None:
    """`prompt_cache_retention` and `prompt_cache_options` (chat and responses): the server's prompt
    cache is in memory and implicit, so only what describes that is taken."""
    if retention == "24h":
        raise _unsupported(
            "prompt_cache_retention",
            "'24h' is not supported by this server: its prompt cache is in memory only ('in_memory').",
        )
    opts = options or {}
    for key in opts:
        if key not in ("ttl", "mode"):
            raise InvalidRequest(
                f"Unrecognized request argument supplied: 'prompt_cache_options.{key}'.",
                param=f"prompt_cache_options.{key}",
                code="unknown_parameter",
            )
    if opts.get("ttl") not in (None, "30m"):
        raise InvalidRequest(
            f"Invalid value for 'prompt_cache_options.ttl': {opts['ttl']!r}. Supported values are: '30m'.",
            param="prompt_cache_options.ttl",
            code="invalid_value",
        )
    if opts.get("mode") not in (None, "implicit"):
        raise _unsupported(
            "prompt_cache_options.mode",
            f"{opts['mode']!r} is not supported by this server: its prompt cache is implicit only.",
        )


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's Metadata: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise InvalidRequest(
            f"Invalid 'metadata': too many keys ({len(metadata)}); at most 16 are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequest(
                f"Invalid 'metadata': the key {key[:70]!r}... is longer than 64 characters.",
                param="metadata",
                code="invalid_value",
            )
        if len(value) > 512:
            raise InvalidRequest(
                f"Invalid 'metadata': the value of {key!r} is longer than 512 characters.",
                param="metadata",
                code="invalid_value",
            )


def check_refused(req: ChatCompletionRequest) -> None:
    """The spec's fields this server cannot honour: each is a 400 naming it, never ignored."""
    if req.store and req.stream:
        raise _unsupported(
            "store",
            "together with 'stream' is not supported by this server: only non-streamed chat "
            "completions are stored. Leave 'store' unset or false, or do not stream.",
        )
    if req.audio is not None:
        raise _unsupported("audio", "is not supported by this server: it produces text only.")
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        raise _unsupported("modalities", "other than ['text'] is not supported by this server.")
    if req.prediction is not None:
        raise _unsupported("prediction", "(predicted outputs) is not supported by this server.")
    if req.web_search_options is not None:
        raise _unsupported("web_search_options", "is not supported by this server: it has no web search.")
    if req.moderation is not None:
        raise _unsupported("moderation", "is not supported by this server: it runs no moderation model.")
    if req.reasoning_effort is not None:
        raise _unsupported(
            "reasoning_effort", "is not supported with this model: the models served here do not reason."
        )
    if req.verbosity not in (None, "medium"):
        raise _unsupported("verbosity", "other than 'medium' (the default) is not supported by this server.")
    check_prompt_cache(req.prompt_cache_retention, req.prompt_cache_options)


_TOOL_PARAMS = re.compile(r"tools\[(\d+)\]\.function|tools|tool_choice")


def _legacy_name(text: str) -> str:
    """A tools error's wording in the legacy `functions` / `function_call` names."""
    return _TOOL_PARAMS.sub(
        lambda m: (
            f"functions[{m.group(1)}]"
            if m.group(1)
            else {"tools": "functions"}.get(m.group(0), "function_call")
        ),
        text,
    )


def tool_spec(req: ChatCompletionRequest) -> tool_calls.ToolSpec | None:
    """The request's function calling, from `tools` / `tool_choice` or the legacy `functions` /
    `function_call` (mapped onto them: one call at most, answered as `message.function_call`)."""
    if req.functions is None and req.function_call is None:
        try:
            return tool_calls.validate(req.tools, req.tool_choice, req.parallel_tool_calls)
        except tool_calls.InvalidTools as e:
            raise InvalidRequest(str(e), param=e.param, code="invalid_value") from None
    if req.tools is not None or req.tool_choice is not None:
        raise InvalidRequest(
            "Invalid 'functions': use either 'tools' / 'tool_choice' or the deprecated 'functions' / "
            "'function_call', not both.",
            param="functions",
            code="invalid_value",
        )
    tools = [{"type": "function", "function": f} for f in req.functions or []]
    fc = req.function_call
    if isinstance(fc, dict):
        if set(fc) != {"name"} or not isinstance(fc.get("name"), str):
            raise InvalidRequest(
                "Invalid 'function_call': expected 'none', 'auto' or {'name': ...}.",
                param="function_call",
                code="invalid_value",
            )
        fc = {"type": "function", "function": {"name": fc["name"]}}
    try:
        return tool_calls.validate(tools, fc, False)
    except tool_calls.InvalidTools as e:
        raise InvalidRequest(
            _legacy_name(str(e)), param=_legacy_name(e.param), code="invalid_value"
        ) from None


def check_supported(req: ChatCompletionRequest) -> tool_calls.ToolSpec | None:
    """Validate what pydantic cannot; returns the request's function-calling spec."""
    check_refused(req)
    check_metadata(req.metadata)
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
    spec = tool_spec(req)
    if req.user or req.safety_identifier or req.prompt_cache_key:
        # Accepted as OpenAI does; here they only go to the server's log, with the key and model,
        # so an operator can trace a request to the application's end user.
        log.info(
            "chat completion for model %s: user=%r safety_identifier=%r prompt_cache_key=%r",
            req.model,
            req.user,
            req.safety_identifier,
            req.prompt_cache_key,
        )
    return spec


def constraint(spec: tool_calls.ToolSpec | None, response_format: dict | None) -> dict:
    """The decoding constraint of a request (SamplingParams' `response_format` and `grammar`): a
    forced tool call's grammar (`tool_choice` required or named), else the response format."""
    forced = spec is not None and spec.choice in ("required", "named")
    return {
        "response_format": None if forced else response_format,
        "grammar": tool_calls.grammar(spec) if forced else None,
    }


def sampling_params(req: ChatCompletionRequest, spec: tool_calls.ToolSpec | None) -> SamplingParams:
    return SamplingParams(
        **serving.common_sampling(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
        **constraint(spec, req.response_format),
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


async def start_chat(
    state,
    principal,
    engine,
    model: ModelRef,
    messages: list[dict],
    params: SamplingParams,
    spec: tool_calls.ToolSpec | None,
    *,
    meter_as: str,
    prompt_param: str = "messages",
) -> serving.Generation:
    """The generation call of a conversation, shared by chat completions and /v1/responses (which
    translates its input items into these messages): the messages through the model's chat
    template, with the tools in the prompt when the spec wants them, then queued on the engine."""
    tools = spec.tools if spec is not None and spec.in_prompt else None
    try:
        prompt = await run_in_threadpool(engine.encode_chat, model, messages, tools=tools)
    except REQUEST_ERRORS as e:
        raise engine_error(e, model, prompt_param=prompt_param) from None
    return await serving.Generation.start(
        state, principal, engine, model, [prompt], params, meter_as=meter_as, prompt_param=prompt_param
    )


async def _start(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> tuple[SamplingParams, serving.Generation]:
    params = sampling_params(req, spec)
    gen = await start_chat(state, principal, engine, model, _messages(req), params, spec, meter_as=req.model)
    return params, gen


async def complete(
    state, principal, engine, model: ModelRef, req: ChatCompletionRequest, spec
) -> ChatCompletion:
    params, gen = await _start(state, principal, engine, model, req, spec)
    parts = [PartialChoice(i) for i in range(params.n)]
    legacy = req.functions is not None
    usage = await serving.collect(gen, lambda _, item: parts[item.index].add(item))

    choices = []
    for part in parts:
        text, reason, calls = part.text, part.finish_reason or "length", []
        if spec is not None and spec.parse:
            text, calls = tool_calls.parse(text, spec.names)
            if not spec.parallel:
                calls = calls[:1]  # `parallel_tool_calls: false` (and legacy functions): one call at most
            if calls and reason == "stop":
                reason = "function_call" if legacy else "tool_calls"
        if legacy:
            message = AssistantMessage(
                content=text,
                function_call=FunctionCall(name=calls[0]["name"], arguments=calls[0]["arguments"])
                if calls
                else None,
            )
        else:
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
    return _sse(gen, model.name, params, spec, include_usage=include_usage, legacy=req.functions is not None)


def _sse(
    gen: serving.Generation,
    model_name: str,
    params: SamplingParams,
    spec,
    *,
    include_usage: bool,
    legacy: bool = False,
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
            if call.index > 0 and not spec.parallel:
                continue  # one call at most (`parallel_tool_calls: false`, legacy functions)
            if legacy:  # the deprecated form: `function_call` pieces, name first, then arguments
                piece = call.wire()["function"]
                delta = {"function_call": piece if call.id is not None else {"arguments": call.arguments}}
            else:
                delta = {"tool_calls": [call.wire()]}
            out.append(chunk([ChunkChoice(index=item.index, delta=delta)], **usage_field))
        if item.finish_reason:
            reason = item.finish_reason
            if parser is not None and parser.calls and reason == "stop":
                reason = "function_call" if legacy else "tool_calls"
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
