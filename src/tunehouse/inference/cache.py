"""The KV cache of a running batch: its layers and the row operations the scheduler does on it.

A batch's cache holds one row per running sequence, left-padded to one length, with an attention
mask [rows, length] that is 0 over the padding. Sequences join (their prefilled caches padded on the
left to the longer of the two, `append_rows`) and leave (`select_rows`, which also trims columns
that became padding in every row); a prefill starts from the cached beginnings of its prompts
(`fill_left`) and hands each prompt's keys and values to the prefix cache (`row_kv`).
`GrowingLayer` makes appending a decode step's position cheap. Kept apart from the scheduler so the
tensor layout lives in one place, next to the layer that defines it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A KV cache layer that appends in place into spare capacity, doubling it when full.

    transformers' `DynamicLayer` concatenates its whole cache with each new token, so a decode step
    copies every layer's cache: at a batch of 16 that copying cost more than the model's matmuls.
    Here `keys`/`values` are views of the first positions of larger buffers; assigning them (joining
    and dropping rows) replaces the buffers.

    The buffers are position-major, [capacity, batch, KV heads, head dim], and `keys`/`values` are
    permuted views of them in transformers' layout [batch, KV heads, length, head dim]. Batch-major
    buffers would leave the capacity's spare positions between each row's used ones, and PyTorch's
    CPU `bmm` reads such gapped batches far more slowly than the decode step's attention reads
    position-major ones (16 rows, 85 of 128 positions, 30 layers out of cache: 209 against 167 µs
    a layer for both matmuls, best of 30); each step's new position is also one contiguous write.

    `store_dtype` keeps the cache in another dtype than the model's: fp32 for bf16 models on a CPU,
    whose decode step (`tunehouse.inference.decode`) attends in fp32 because PyTorch's bf16 CPU
    kernels are slow there (see `LlamaDecoder._attend`). It costs twice the cache memory."""

    def __init__(self, store_dtype: torch.dtype | None = None, **kwargs):
        self._k: torch.Tensor | None = None  # [capacity, batch, KV heads, head dim]
        self._v: torch.Tensor | None = None
        self._k_len = self._v_len = 0  # separate: the scheduler assigns keys, then values
        self.store_dtype = store_dtype
        super().__init__(**kwargs)

    @staticmethod
    def _view(buffer: torch.Tensor | None, length: int) -> torch.Tensor | None:
        return None if buffer is None else buffer[:length].permute(1, 2, 0, 3)

    @staticmethod
    def _buffer(value: torch.Tensor) -> torch.Tensor:
        return value.permute(2, 0, 1, 3).contiguous()  # no copy when `value` is such a view already

    @property
    def keys(self):  # type: ignore[override]
        return self._view(self._k, self._k_len)

    @keys.setter
    def keys(self, value):
        self._k, self._k_len = (None, 0) if value is None else (self._buffer(value), value.shape[-2])

    @property
    def values(self):  # type: ignore[override]
        return self._view(self._v, self._v_len)

    @values.setter
    def values(self, value):
        self._v, self._v_len = (None, 0) if value is None else (self._buffer(value), value.shape[-2])

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = self.store_dtype or key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=self.dtype)
        self.values = value_states.new_empty(
            (*value_states.shape[:2], 0, value_states.shape[-1]), dtype=self.dtype
        )
        self.is_initialized = True

    @staticmethod
    def _append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
        end = length + new.shape[-2]
        if end > buffer.shape[0]:
            grown = buffer.new_empty((max(2 * buffer.shape[0], end, 64), *buffer.shape[1:]))
            grown[:length] = buffer[:length]
            buffer = grown
        buffer[length:end] = new.permute(2, 0, 1, 3)
        return buffer

    def append(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """Add positions; the whole cache, in its own dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k = self._append(self._k, self._k_len, key_states)
        self._v = self._append(self._v, self._v_len, value_states)
        self._k_len += key_states.shape[-2]
        self._v_len += value_states.shape[-2]
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' call: the whole cache in the model's dtype."""
        fresh = self.get_seq_length() == 0
        keys, values = self.append(key_states, value_states)
        if keys.dtype == key_states.dtype:
            return keys, values
        if fresh:  # a prompt into an empty cache (the engine's prefill): it is the whole cache
            return key_states, value_states
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def get_seq_length(self) -> int:
        return self._k_len if self.is_initialized else 0


def new_cache(config, store_dtype: torch.dtype | None = None) -> DynamicCache:
    """An empty cache for a model of `config`: `GrowingLayer`s (keeping `store_dtype` where given)
    for plain full-attention layers, transformers' own for the others (sliding windows)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer(store_dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros before it along `dim` up to `length` (as it is when that long already)."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def fill_left(cache: DynamicCache, hits: list[torch.Tensor | None], start: int) -> None:
    """Put cached prompt beginnings into an empty cache as its first `start` positions: row i's
    hit [layers, 2, KV heads, its length, head dim] right-aligned at column `start`, zeros before
    it (and all zeros for a row without one). `start` is the longest hit's length."""
    cached = [0 if hit is None else hit.shape[3] for hit in hits]
    longest = hits[cached.index(start)]
    layers, _, heads, _, dim = longest.shape
    kv = longest.new_zeros((layers, 2, len(hits), heads, start, dim))
    for i, hit in enumerate(hits):
        if hit is not None:
            kv[:, :, i, :, start - cached[i] :] = hit
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values


def row_kv(cache: DynamicCache, mask: torch.Tensor, row: int) -> torch.Tensor:
    """Row `row`'s keys and values after its prefill, padding left out: [layers, 2, kv heads,
    prompt length, head dim]."""
    index = mask[row].nonzero().squeeze(1).to(cache.layers[0].keys.device)
    return torch.stack(
        [
            torch.stack([layer.keys[row].index_select(1, index), layer.values[row].index_select(1, index)])
            for layer in cache.layers
        ]
    )


def select_rows(
    cache: DynamicCache, mask: torch.Tensor, keep: list[int]
) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only the rows `keep` (in that order), in place; returns the cache and its new mask."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    # Columns that are padding in every remaining row are dropped from the left.
    start = int(mask.any(0).long().argmax())
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
        layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
    return cache, mask[:, start:]


def append_rows(
    cache: DynamicCache, mask: torch.Tensor, new: DynamicCache, new_mask: torch.Tensor
) -> torch.Tensor:
    """Join `new`'s rows after `cache`'s, in place, padding the shorter of the two on the left;
    returns the joined mask."""
    total = max(mask.shape[1], new_mask.shape[1])
    for old, added in zip(cache.layers, new.layers, strict=True):
        old.keys = torch.cat([left_pad(old.keys, total, 2), left_pad(added.keys, total, 2)])
        old.values = torch.cat([left_pad(old.values, total, 2), left_pad(added.values, total, 2)])
    return torch.cat([left_pad(mask, total, 1), left_pad(new_mask, total, 1)])
