"""Rollouts: a group of sampled answers per prompt from a model held in memory (the one a
reinforcement job is training), all prompts' groups decoded together as one batch.

The serving engine decodes weights it loaded from disk; a training step needs answers from the
weights as they are now, without saving and reloading an adapter every step. So the prompts go
through the training model's own forward (a PeftModel or a plain transformers model) into the
serving engine's KV cache, and the decode steps through the serving engine's fast decode step
(`decode.LlamaDecoder`) over a copy of the weights made for this rollout, the LoRA adapter folded
in (`MergedProjections`): one matmul per block input, where PEFT runs three per layer and
transformers' forward adds its per-call machinery. The training model is not touched. A model the
fast step does not cover decodes through its own forward, the adapter merged for the while
(`merged_adapter`). Tokens are picked by the serving engine's sampler (sampling.pick_tokens:
per-row seeded generators, so a rollout's answers are a function of its seed whatever the batch).
Rows that have finished stop being computed: the batch shrinks as answers end, and a prompt whose
answers have all ended is handed to `on_group` at once (the job grades it while the rest decode).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunehouse.inference.cache import new_cache, select_rows
from tunehouse.inference.constrained import GrammarMatcher
from tunehouse.inference.decode import fast_decoder
from tunehouse.inference.engine import SamplingParams
from tunehouse.inference.models import stop_token_ids
from tunehouse.inference.sampling import adjust_logits, pick_tokens, seeded_generator


@dataclass(frozen=True)
class Constraint:
    """A format every answer follows (a response_format's grammar, inference/constrained.py)."""

    tokenizer: Any  # llguidance's view of the model's tokenizer (constrained.build_tokenizer)
    grammar: str


def sample_groups(
    model,
    prompts: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_ids: set[int],
    pad_id: int,
    top_p: float = 1.0,
    on_group: Callable[[int, list[list[int]]], None] | None = None,
    constraint: Constraint | None = None,
) -> list[list[list[int]]]:
    """For each prompt (token ids), `n` answers (token ids, ending with an end-of-turn token when
    the model stopped by itself (one of `eos_ids` or the model's own end tokens), without it when
    cut at max_new_tokens). Temperature 0 is greedy. `on_group(i, answers)` is called once prompt
    i's answers are all complete, while the others still decode. With a `constraint`, each answer
    follows its grammar (tokens it does not allow are masked before sampling, as serving does).
    Call it under torch.no_grad() with the model in eval mode (and under the autocast the model trains with: the weights for
    decoding are copied in its dtype)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Where serving stops too: the model's and its generation config's end tokens.
    no_tokenizer = SimpleNamespace(eos_token_id=None)
    eos_ids = set(eos_ids) | set(
        stop_token_ids(inner.config, getattr(inner, "generation_config", None), no_tokenizer)
    )
    rows = [p for p in prompts for _ in range(n)]
    n_rows = len(rows)
    if n_rows == 0:
        return []
    device = next(model.parameters()).device
    dtype = _compute_dtype(inner, device)
    decoder = None
    if _plain_lora(model):
        decoder = fast_decoder(inner, lambda parent, names: MergedProjections(parent, names, dtype))
    # The decode step attends in fp32 on a CPU (see cache.GrowingLayer); transformers' own forward
    # attends in the cache's dtype.
    kv_dtype = (
        torch.float32 if decoder is not None and device.type == "cpu" and dtype != torch.float32 else None
    )
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    generators = [seeded_generator(seed, i) for i in range(n_rows)]
    matchers = None
    if constraint is not None:
        matchers = [GrammarMatcher(constraint.tokenizer, constraint.grammar) for _ in range(n_rows)]
        ends = frozenset(eos_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token goes in the same column
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    answers: list[list[int]] = [[] for _ in range(n_rows)]
    open_rows = [n] * len(prompts)  # per prompt, its answers still being decoded
    live = list(range(n_rows))  # which rows are still being decoded, in cache order
    cache = new_cache(inner.config, kv_dtype)
    with merged_adapter(model) if decoder is None else nullcontext():
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        last_pos = positions[:, -1]
        for step in range(max_new_tokens):
            logits = logits.float()
            if matchers is not None:
                for k, row in enumerate(live):
                    adjust_logits(logits[k], sampling, counts=None, bias=None, matcher=matchers[row])
            tokens = pick_tokens(logits, [sampling] * len(live), [generators[i] for i in live])
            keep = []
            for k, (row, token) in enumerate(zip(live, tokens, strict=True)):
                answers[row].append(token)
                if matchers is not None:
                    matchers[row].consume(token, ends)
                if token not in eos_ids and step < max_new_tokens - 1:
                    keep.append(k)
                else:
                    open_rows[row // n] -= 1
                    if open_rows[row // n] == 0 and on_group is not None:
                        on_group(row // n, answers[row // n * n : (row // n + 1) * n])
            if not keep:
                break
            if len(keep) < len(live):  # drop finished rows from the batch and the cache
                cache, mask = select_rows(cache, mask, keep)
                live, last_pos = [live[k] for k in keep], last_pos[torch.tensor(keep, device=device)]
                tokens = [tokens[k] for k in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            step_ids = torch.tensor(tokens, device=device).unsqueeze(1)
            if decoder is not None:
                logits = decoder.step(step_ids, last_pos.unsqueeze(1), mask, cache)
            else:
                logits = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=last_pos.unsqueeze(1),
                    cache=cache,
                    use_cache=True,
                ).logits[:, -1]
    return [answers[i * n : (i + 1) * n] for i in range(len(prompts))]


def _compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on (a full fine-tune keeps fp32 weights
    and trains under bf16 autocast), else the weights' own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def _lora_updates(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(B, A, scale) of each LoRA adapter active on `layer` (a PEFT LoRA layer, or any other
    module: none): its weight update is scale * B @ A."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return []
    names = [a for a in getattr(layer, "active_adapters", ()) if a in getattr(layer, "lora_A", {})]
    return [(layer.lora_B[a].weight, layer.lora_A[a].weight, layer.scaling[a]) for a in names]


def _merged(weight: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """`weight` + each update's scale * B @ A, in fp32 (rounded once, by whoever casts it)."""
    merged = weight.float()
    for up, down, scale in updates:
        merged = torch.addmm(merged, up.float(), down.float(), alpha=scale)
    return merged


def _plain_lora(model: nn.Module) -> bool:
    """Whether every LoRA layer's update is scale * B @ A (not so for DoRA's magnitudes or
    fan-in-fan-out Conv1D layers): only then can it be folded into a copy of the weights."""
    for mod in model.modules():
        if hasattr(mod, "use_dora") and (any(mod.use_dora.values()) or getattr(mod, "fan_in_fan_out", False)):
            return False
    return True


class MergedProjections:
    """The linear layers of one block that read the same input (q/k/v, o, gate/up, down) for a
    rollout's decode steps: one matmul over a copy of their weights, side by side, in the dtype
    matmuls run in, each LoRA adapter folded in once (in fp32, rounded once). A fine-tune's
    weights change every step, so the copy is made per rollout; its cost (SmolLM2-135M: ~0.1 s)
    is that of one or two decode steps. Layers without an adapter, already in that dtype, are not
    copied: they keep a matmul each (a copy for one matmul would add their size to memory)."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], dtype: torch.dtype):
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        copied = []
        for name in names:
            layer = getattr(parent, name)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            updates = _lora_updates(layer)
            weight = _merged(base.weight.detach(), updates) if updates else base.weight.detach()
            copied.append(bool(updates) or weight.dtype != dtype)
            bias = None if base.bias is None else base.bias.detach().to(dtype)
            self.parts.append((weight.to(dtype), bias))
        if len(self.parts) > 1 and all(copied):
            weights = [w for w, _ in self.parts]
            bias = None
            if any(b is not None for _, b in self.parts):
                bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in self.parts])
            self.parts = [(torch.cat(weights), bias)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.parts[0][0].dtype)
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)


@contextmanager
def merged_adapter(model):
    """The LoRA adapter folded into the weights while a model the fast decode step does not cover
    samples through its own forward, the adapter path off: the plain model's matmuls, without
    PEFT's two extra small matmuls on each wrapped projection at every token. Each wrapped layer
    decodes with a merged copy and gets its own weight back afterwards (merging into a bf16 weight
    and unmerging would round it a little every step). A model without an adapter samples as it
    is."""
    layers = [mod for mod in model.modules() if hasattr(mod, "get_base_layer") and _lora_updates(mod)]
    if not layers or not _plain_lora(model):  # (another variant: sampled with the adapter on)
        yield
        return
    originals = []
    for layer in layers:
        weight = layer.get_base_layer().weight
        merged = _merged(weight.data, _lora_updates(layer))
        originals.append((weight, weight.data))
        weight.data = merged.to(weight.dtype)
    try:
        with model.disable_adapter():
            yield
    finally:
        for weight, data in originals:
            weight.data = data
