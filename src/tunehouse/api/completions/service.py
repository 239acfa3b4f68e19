"""Legacy completions: a prompt (or several) continued as plain text, for base and fine-tuned models.

No chat template: the prompt is tokenized as given (or taken as token ids). Several prompts run as
separate engine requests at once (they share the engine's batch); choice `i * n + j` is the j-th
completion of prompt i, as OpenAI numbers them. Running them (streaming, metering, a client that
leaves) is `api/serving.py`'s, as for chat; chunks are the `Completion` wire model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from tunehouse import ids
from tunehouse.api import serving
from tunehouse.api.chat.protocol import CompletionUsage
from tunehouse.api.completions.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from tunehouse.api.serving import REQUEST_ERRORS, engine_error
from tunehouse.errors import InvalidRequest
from tunehouse.inference.engine import Delta, ModelRef, PartialChoice, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


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
    serving.logit_bias(req.logit_bias)
    if req.user:  # accepted as OpenAI does; here it only goes to the server's log
        log.info("completion for model %s: user=%r", req.model, req.user)


def _raw_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def sampling_params(req: CompletionRequest) -> SamplingParams:
    return SamplingParams(
        **serving.common_sampling(req),
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


async def _start(
    state, principal, engine, model: ModelRef, req: CompletionRequest
) -> tuple[SamplingParams, list[tuple[list[int], str]], serving.Generation]:
    params = sampling_params(req)
    try:
        prompts = await run_in_threadpool(_encode, engine, model, _raw_prompts(req))
    except REQUEST_ERRORS as e:
        raise engine_error(e, model, prompt_param="prompt") from None
    gen = await serving.Generation.start(
        state,
        principal,
        engine,
        model,
        [token_ids for token_ids, _ in prompts],
        params,
        meter_as=req.model,
        prompt_param="prompt",
    )
    return params, prompts, gen


async def complete(state, principal, engine, model: ModelRef, req: CompletionRequest) -> Completion:
    params, prompts, gen = await _start(state, principal, engine, model, req)
    n = params.n
    choices = [
        _Choice(k * n + j, prompts[k][1] if req.echo else "") for k in range(len(prompts)) for j in range(n)
    ]
    usage = await serving.collect(gen, lambda k, item: choices[k * n + item.index].add(item))
    return Completion(
        id=ids.text_completion_id(),
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
        usage=serving.usage_of(usage),
    )


async def open_stream(
    state, principal, engine, model: ModelRef, req: CompletionRequest
) -> AsyncIterator[str]:
    """Validates and queues before the first byte (so errors get a proper status), then yields SSE lines."""
    params, prompts, gen = await _start(state, principal, engine, model, req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(gen, req, model.name, params, prompts, include_usage=include_usage)


def _sse(
    gen: serving.Generation,
    req: CompletionRequest,
    model_name: str,
    params: SamplingParams,
    prompts: list[tuple[list[int], str]],
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Each chunk is a `text_completion` with the choices that changed, as OpenAI streams them."""
    chunk_id, created, n = ids.text_completion_id(), int(time.time()), params.n
    # Where each choice's text stands, for the logprobs' text offsets (after the echoed prompt).
    offsets = {
        k * n + j: len(prompts[k][1]) if req.echo else 0 for k in range(len(prompts)) for j in range(n)
    }

    def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> str:
        body = Completion(id=chunk_id, created=created, model=model_name, choices=choices, usage=usage)
        return serving.sse(body, exclude=None if include_usage else {"usage"})

    def pieces(k: int, item: Delta) -> list[str]:
        index = k * n + item.index
        lp = None
        if params.logprobs and item.logprobs:
            lp = legacy_logprobs(item.logprobs, offsets[index])
        offsets[index] += len(item.text)
        if not (item.text or lp or item.finish_reason):
            return []
        return [
            chunk(
                [CompletionChoice(text=item.text, index=index, logprobs=lp, finish_reason=item.finish_reason)]
            )
        ]

    opening = (
        [
            chunk(
                [
                    CompletionChoice(
                        text=prompts[index // n][1], index=index, logprobs=None, finish_reason=None
                    )
                ]
            )
            for index in offsets
        ]
        if req.echo
        else []
    )
    return serving.stream(
        gen,
        opening=opening,
        chunks=pieces,
        usage_chunk=(lambda u: chunk([], usage=serving.usage_of(u))) if include_usage else None,
    )
