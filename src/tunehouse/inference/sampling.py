"""Sampling: from one decode step's logits to each sequence's next token, with its own parameters.

OpenAI's knobs, applied per row in this order: frequency/presence penalties (from the tokens the
choice generated so far), `logit_bias`, the grammar's mask of allowed tokens, then greedy
(temperature 0) or temperature with nucleus (top_p) sampling from the row's own seeded generator;
plus the log probabilities reported for each chosen token. Kept apart from the scheduler as plain
functions of tensors and parameters: what a token's odds are does not depend on how the batch is
run.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from tunehouse.inference.constrained import GrammarMatcher
from tunehouse.inference.engine import SamplingParams, TokenLogprob, TopLogprob


def seeded_generator(seed: int | None, index: int) -> np.random.Generator:
    """The generator of choice `index` of a request: each choice draws from its own, so the same
    seed gives the same answers whatever else is in the batch, and different choices of one request
    differ. No seed: a random one. (NumPy's PCG64: its exponential draws are ~10x faster than a
    torch.Generator's, and sampling draws one per vocabulary entry per step.)"""
    return np.random.Generator(
        np.random.PCG64((seed * 1_000_003 + index) % 2**63 if seed is not None else random.getrandbits(63))
    )


def logit_bias_tensors(logit_bias: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A request's `logit_bias` as (token ids, values), ready to add to a row of logits."""
    if not logit_bias:
        return None
    ids = sorted(logit_bias)
    return torch.tensor(ids), torch.tensor([float(logit_bias[i]) for i in ids])


def adjust_logits(
    row: torch.Tensor,
    params: SamplingParams,
    *,
    counts: torch.Tensor | None,
    bias: tuple[torch.Tensor, torch.Tensor] | None,
    matcher: GrammarMatcher | None,
) -> None:
    """Apply one sequence's penalties (`counts`: how often it generated each token), logit bias and
    grammar mask to its row of logits [vocabulary], in place."""
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        row -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    if bias is not None:
        ids, values = bias
        row[ids] += values
    if matcher is not None:
        allowed = matcher.allowed(row.shape[0])
        if allowed is not None:
            row.masked_fill_(~torch.from_numpy(allowed), float("-inf"))


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[np.random.Generator]
) -> list[int]:
    """Each row's next token [rows, vocabulary] → rows: the most likely where the temperature is 0,
    else drawn from the row's generator at its temperature, from its top_p nucleus.

    A draw is an exponential race (what `torch.multinomial` does for one sample): the token with
    the largest p / E, one E ~ Exp(1) per candidate token from the row's own generator. Unlike an
    inverse-CDF draw it does not turn on a cumulative sum: logits that differ in the last bits
    (the same prompt computed with and without the prefix cache, or in another batch) pick the
    same token unless two tokens' races end within that rounding, so a seed gives the same answer
    however the request was batched. Rows are raced together: one division and one argmax for all,
    after each row's noise is drawn (~0.3 ms a 49k row; torch.multinomial per row took ~1.4 ms)."""
    tokens = argmax_rows(logits).tolist()  # greedy rows keep this
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    temps = torch.tensor([params[i].temperature for i in sampled]).unsqueeze(1)
    probs = torch.softmax(logits[sampled].float() / temps, dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled])
    rows = [generators[i] for i in sampled]
    picks = torch.empty(len(sampled), dtype=torch.long)
    nucleus = top_p < 1.0
    if nucleus.any():
        which = nucleus.nonzero().squeeze(1).tolist()
        picks[nucleus] = _nucleus_pick(probs[nucleus], top_p[nucleus], [rows[k] for k in which])
    if not nucleus.all():
        which = (~nucleus).nonzero().squeeze(1).tolist()
        picks[~nucleus] = _race(probs[~nucleus], [rows[k] for k in which])
    for i, token in zip(sampled, picks.tolist(), strict=True):
        tokens[i] = token
    return tokens


def _nucleus_pick(probs: torch.Tensor, top_p: torch.Tensor, generators: list) -> torch.Tensor:
    """Draws from each row's top_p nucleus: the smallest set of most likely tokens whose mass
    reaches top_p. The nucleus is looked for among the row's most likely NUCLEUS_CANDIDATES tokens
    first (a partial sort, ~10x cheaper than sorting the vocabulary, and only those tokens race);
    when some row's nucleus is wider than that, the rows are sorted whole."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[1])
    sorted_p, order = probs.topk(k, dim=-1)
    if (sorted_p.sum(-1) < top_p).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p.
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(1)] = 0.0
    return order.gather(1, _race(sorted_p, generators).unsqueeze(1)).squeeze(1)


NUCLEUS_CANDIDATES = 1024


def _race(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """For rows of (unnormalised, non-negative) probabilities [rows, n]: in each row, the index
    with the largest p / E, E ~ Exp(1) drawn from the row's generator, which is a draw from the
    row's distribution. A token of probability 0 never wins while any has mass."""
    noise = np.empty(tuple(probs.shape), dtype=np.float32)
    for row, generator in zip(noise, generators, strict=True):
        generator.standard_exponential(out=row, dtype=np.float32)
    # A draw can be exactly 0 (once in 2**24): 0/0 would be NaN, which argmax takes as the largest.
    np.maximum(noise, np.finfo(np.float32).tiny, out=noise)
    return argmax_rows(probs / torch.from_numpy(noise))


def token_logprob(
    logp: torch.Tensor, token: int, top_k: int, bytes_of: Callable[[int], bytes]
) -> TokenLogprob:
    """The logprob entry of a chosen token, with the `top_k` most likely tokens at its position;
    `logp` is the position's log-softmax [vocabulary], `bytes_of` a token's bytes."""
    top = []
    if top_k:
        values, ids = logp.topk(top_k)
        top = [_top_logprob(bytes_of, int(t), float(v)) for v, t in zip(values, ids, strict=True)]
    entry = _top_logprob(bytes_of, token, float(logp[token]))
    return TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=top)


def _top_logprob(bytes_of: Callable[[int], bytes], token: int, logprob: float) -> TopLogprob:
    raw = bytes_of(token)
    return TopLogprob(
        token=raw.decode("utf-8", errors="replace"), logprob=clamp_logprob(logprob), bytes=list(raw)
    )


def clamp_logprob(x: float) -> float:
    return -9999.0 if x == float("-inf") else x  # what OpenAI reports for impossible tokens


def argmax_rows(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of a [rows, vocabulary] tensor, same answer (the first of equal
    maxima; NaN counts as the largest), several times faster on a CPU: PyTorch's argmax kernel is
    not vectorised (16 rows of 49,152: 350 µs, against 24 µs for `amax`), so the maximum of each
    block of columns is found with `amax`, then the argmax runs inside the one block per row that
    holds the row's maximum. When the width is not a multiple of `block`, the columns past the last
    whole block are searched as the `block` columns that end the row: the columns that window shares
    with the block before it all hold less than the maximum it was picked for."""
    rows, width = logits.shape
    n = width // block
    if n < 2:
        return logits.argmax(dim=-1)
    peaks = logits[:, : n * block].reshape(rows, n, block).amax(dim=-1)  # a view when rows are contiguous
    if n * block < width:
        peaks = torch.cat([peaks, logits[:, n * block :].amax(dim=-1, keepdim=True)], dim=1)
    start = (peaks.argmax(dim=-1) * block).clamp_(max=width - block)
    window = logits.gather(1, start[:, None] + torch.arange(block, device=logits.device))
    return start + window.argmax(dim=-1)
