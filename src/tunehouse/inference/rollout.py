"""Rollouts: a group of sampled answers per prompt from a model held in memory (the one a
reinforcement job is training), all prompts' groups decoded together as one batch.

The serving engine decodes weights it loaded from disk; a training step needs answers from the
weights as they are now, without saving and reloading an adapter every step. So this drives the
training model's own forward (a PeftModel or a plain transformers model) with a KV cache, left
padding and the serving engine's sampler (sampling.pick_tokens: per-row seeded generators, so a
step's answers are a function of its seed whatever the batch). Rows that have finished stop being
computed: the batch shrinks as answers end.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tunehouse.inference.engine import SamplingParams
from tunehouse.inference.models import stop_token_ids
from tunehouse.inference.sampling import pick_tokens, seeded_generator


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
) -> list[list[list[int]]]:
    """For each prompt (token ids), `n` answers (token ids, ending with an end-of-turn token when
    the model stopped by itself (one of `eos_ids` or the model's own end tokens), without it when cut at max_new_tokens). Temperature 0 is greedy.
    Call it under torch.no_grad() with the model in eval mode."""
    from transformers import DynamicCache  # seconds to import: only a process that samples pays

    # Where serving stops too: the model's and its generation config's end tokens.
    no_tokenizer = SimpleNamespace(eos_token_id=None)
    eos_ids = set(eos_ids) | set(
        stop_token_ids(model.config, getattr(model, "generation_config", None), no_tokenizer)
    )
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(n)]
    n_rows = len(rows)
    if n_rows == 0:
        return []
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    generators = [seeded_generator(seed, i) for i in range(n_rows)]
    width = max(len(r) for r in rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token goes in the same column
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    answers: list[list[int]] = [[] for _ in range(n_rows)]
    live = torch.arange(n_rows)  # which rows are still being decoded, in cache order
    cache = DynamicCache()  # filled in place by each forward
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        tokens = pick_tokens(out.logits[:, -1].float(), [sampling] * len(live), [generators[i] for i in live])
        keep = []
        for k, (row, token) in enumerate(zip(live.tolist(), tokens, strict=True)):
            answers[row].append(token)
            if token not in eos_ids:
                keep.append(k)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            live, mask, last_pos = live[keep], mask[index], last_pos[index]
            tokens = [tokens[k] for k in keep]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            attention_mask=mask,
            position_ids=last_pos.unsqueeze(1),
            cache=cache,
            use_cache=True,
        )
    return [answers[i * n : (i + 1) * n] for i in range(len(prompts))]
