"""What serving knows about a base model: the engine's loaded state of one base, and the facts read
from a model folder's configs that more than the engine needs (the tokens that end a turn, which
export writes into the generation config, and the context length).

Kept apart from the engine (`tunehouse.inference.hf`) so the scheduler and sampling can name a
loaded base without importing the engine, and export can end a turn exactly where serving does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: export reads stop tokens without loading torch or the engine
    import torch

    from tunehouse.inference.decode import LlamaDecoder
    from tunehouse.inference.lora import MultiLora
    from tunehouse.inference.prefix import PrefixCache


@dataclass
class LoadedBase:
    """One base model as the engine holds it: tokenizer and limits at once, the weights (and what
    is built on them) when the first request for it is admitted."""

    path: Path
    tokenizer: Any
    has_tools: bool
    max_context: int
    eos_ids: frozenset[int]
    pad_id: int
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    model: Any = None  # the transformers model (its LoRA-targeted layers wrapped once adapters load)
    lora: MultiLora | None = None  # the loaded adapters, created with the model
    decoder: LlamaDecoder | None = None  # the fast decode step, where the architecture has one
    kv_dtype: torch.dtype | None = None  # the KV cache's, where it differs from the model's
    prefix: PrefixCache | None = None  # KV of prompt beginnings read before, where enabled and possible
    adapters: OrderedDict[str, int] = field(default_factory=OrderedDict)  # adapter folder → slot, LRU order
    grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, built on first structured request
    token_bytes: dict[int, bytes] = field(default_factory=dict)  # for logprobs

    def bytes_of(self, token: int) -> bytes:
        """A token's bytes, for logprobs (`grammar_tokenizer` must be built: the engine builds it
        when a request asks for logprobs)."""
        raw = self.token_bytes.get(token)
        if raw is None:
            raw = self.token_bytes[token] = self.grammar_tokenizer.decode_bytes([token])
        return raw


def stop_token_ids(config, generation_config, tokenizer) -> list[int]:
    """Every token id that ends a turn: the model config's `eos_token_id`, then the generation
    config's (None where the model has none), then the tokenizer's end token, each once, in that
    order (the first is the padding fallback). Serving stops at all of them; export writes them
    into the generation config so plain `generate` stops where the server does."""
    ids: list[int] = []
    sources = (
        getattr(config, "eos_token_id", None),
        None if generation_config is None else generation_config.eos_token_id,
        tokenizer.eos_token_id,
    )
    for value in sources:
        ids += [i for i in _as_ids(value) if i not in ids]
    return ids


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def max_context(config, tokenizer) -> int:
    """The longest prompt plus completion the model takes: its config's position limit, else the
    tokenizer's `model_max_length` where that is a real limit, else 2048."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048
