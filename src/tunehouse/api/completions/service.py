"""Legacy completions: a prompt (or several) continued as plain text, for base and fine-tuned models.

No chat template: the prompt is tokenized as given (or taken as token ids). Several prompts run as
separate engine requests at once (they share the engine's batch); choice `i * n + j` is the j-th
completion of prompt i, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from tunehouse.api.chat.service import (
    REQUEST_ERRORS,
    Running,
    common_sampling,
    engine_error,
    logit_bias,
    meter,
    meter_later,
    stream_error,
    submit,
    usage_of,
)
from tunehouse.api.completions.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from tunehouse.errors import InvalidRequest
from tunehouse.inference.engine import Delta, ModelRef, PartialChoice, SamplingParams, TokenLogprob, Usage


def check_supported(req: CompletionRequest) -> None:
    """Parameters we cannot honour are refused, never silently ignored."""
    if req.suffix:
        raise InvalidRequest(
            "Unsupported parameter: 'suffix' (fill-in-the-middle) is not supported by this server.",
            param="suffix",
            code="unsupported_parameter",
        )
    if req.best_of not in (None, 1) and req.best_of != (req.n or 1):
        raise InvalidRequest(
            "Unsupported parameter: 'best_of' other than 1 (or equal to 'n') is not supported by this server.",
            param="best_of",
            code="unsupported_parameter",
        )
    if req.echo and req.logprobs is not None:
        raise InvalidRequest(
            "Unsupported parameter: 'echo' together with 'logprobs' (prompt log probabilities) is not "
            "supported by this server.",
            param="echo",
            code="unsupported_parameter",
        )
    prompts = _raw_prompts(req)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("Invalid 'prompt': it must not be empty.", param="prompt", code="invalid_value")
    logit_bias(req.logit_bias)


def _raw_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def sampling_params(req: CompletionRequest) -> SamplingParams:
    return SamplingParams(
        **common_sampling(req),
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
    )


def _encode(engine, model: ModelRef, prompts: list[str | list[int]]) -> list[tuple[list[int], str]]:
    """Token ids and text of each prompt (text for `echo`)."""
    vocab = engine.vocab_size(model)
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((engine.encode_text(model, p), p))
        else:
            if any(not 0 <= t < vocab for t in p):
                raise InvalidRequest(
                    f"Invalid 'prompt': token ids must be between 0 and {vocab - 1}.",
                    param="prompt",
                    code="invalid_value",
                )
            out.append((list(p), engine.decode(model, list(p))))
    return out


class _Choice(PartialChoice):
    def __init__(self, index: int, echo: str):
        super().__init__(index=index, text=echo)  # `echo`: the prompt leads the choice's text
        self.echo_len = len(echo)


def legacy_logprobs(entries: list[TokenLogprob], start: int) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists; `text_offset` from the start of the choice's text."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


async def _start(engine, model: ModelRef, req: CompletionRequest):
    params = sampling_params(req)
    try:
        prompts = await run_in_threadpool(_encode, engine, model, _raw_prompts(req))
    except REQUEST_ERRORS as e:
        raise engine_error(e, model, prompt_param="prompt") from None
    queue: asyncio.Queue = asyncio.Queue()
    runs: list[Running] = []
    try:
        for k, (ids, _) in enumerate(prompts):
            runs.append(await submit(engine, model, ids, params, prompt_param="prompt", queue=queue, tag=k))
    except BaseException:
        for r in runs:
            r.handle.cancel()
        raise
    return params, prompts, queue, runs


async def _events(queue: asyncio.Queue, runs: list[Running]) -> AsyncIterator[tuple[int, Delta | Usage]]:
    """The events of all prompts' requests as they come; cancels them all if left early."""
    remaining = len(runs)
    try:
        while remaining:
            k, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Usage):
                remaining -= 1
            yield k, item
    finally:
        for r in runs:
            r.handle.cancel()


def _cmpl_id() -> str:
    return f"cmpl-{secrets.token_urlsafe(21).replace('-', 'x').replace('_', 'y')[:29]}"


async def complete(state, principal, engine, model: ModelRef, req: CompletionRequest) -> Completion:
    params, prompts, queue, runs = await _start(engine, model, req)
    n = params.n
    choices = [
        _Choice(k * n + j, prompts[k][1] if req.echo else "") for k in range(len(prompts)) for j in range(n)
    ]
    prompt_tokens = completion_tokens = 0
    done = False
    try:
        async for k, item in _events(queue, runs):
            if isinstance(item, Usage):
                prompt_tokens += item.prompt_tokens
                completion_tokens += item.completion_tokens
            else:
                choices[k * n + item.index].add(item)
        done = True
    except REQUEST_ERRORS as e:
        raise engine_error(e, model, prompt_param="prompt") from None
    finally:
        if not done:
            meter_later(state, principal, req.model, *runs)
    await run_in_threadpool(meter, state, principal, req.model, prompt_tokens, completion_tokens)
    return Completion(
        id=_cmpl_id(),
        created=int(time.time()),
        model=model.name,
        choices=[
            CompletionChoice(
                text=c.text,
                index=c.index,
                logprobs=legacy_logprobs(c.logprobs, c.echo_len) if params.logprobs else None,
                finish_reason=c.finish_reason or "length",
            )
            for c in choices
        ],
        usage=usage_of(prompt_tokens, completion_tokens),
    )


async def open_stream(
    state, principal, engine, model: ModelRef, req: CompletionRequest
) -> AsyncIterator[str]:
    params, prompts, queue, runs = await _start(engine, model, req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(state, principal, req, model.name, params, prompts, queue, runs, include_usage)


async def _sse(
    state, principal, req, model_name, params, prompts, queue, runs, include_usage
) -> AsyncIterator[str]:
    base = {"id": _cmpl_id(), "object": "text_completion", "created": int(time.time()), "model": model_name}
    n = params.n
    offsets = {
        k * n + j: len(prompts[k][1]) if req.echo else 0 for k in range(len(prompts)) for j in range(n)
    }

    def chunk(choices: list[dict], **extra) -> str:
        body = {**base, "choices": choices, "system_fingerprint": None, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    prompt_tokens = completion_tokens = 0
    done = False
    try:
        if req.echo:
            for index in offsets:
                text = prompts[index // n][1]
                yield chunk([{"text": text, "index": index, "logprobs": None, "finish_reason": None}])
        async for k, item in _events(queue, runs):
            if isinstance(item, Usage):
                prompt_tokens += item.prompt_tokens
                completion_tokens += item.completion_tokens
                continue
            index = k * n + item.index
            lp = None
            if params.logprobs and item.logprobs:
                lp = legacy_logprobs(item.logprobs, offsets[index]).model_dump()
            offsets[index] += len(item.text)
            if item.text or lp or item.finish_reason:
                yield chunk(
                    [{"text": item.text, "index": index, "logprobs": lp, "finish_reason": item.finish_reason}]
                )
        done = True
        await run_in_threadpool(meter, state, principal, req.model, prompt_tokens, completion_tokens)
        if include_usage:
            yield chunk([], usage=usage_of(prompt_tokens, completion_tokens).model_dump())
    except Exception as e:
        yield stream_error(e)
        return
    finally:
        if not done:
            meter_later(state, principal, req.model, *runs)
    yield "data: [DONE]\n\n"
