"""Prefix caching: the KV cache of prompt beginnings already read, reused by later prompts.

Requests to one fine-tuned model mostly open the same way (its system prompt, the chat template's
markup, few-shot examples), and a prompt's keys and values at a position depend only on the tokens
up to it. So the engine keeps them, in blocks of `block` tokens (vLLM's automatic prefix caching,
with its default block of 16), and a new prompt's prefill computes only what follows its longest
cached beginning. Entries belong to one adapter (LoRA on k/v changes them; None is the base model)
and are dropped with it when it leaves memory.

A block is found by the block before it and its own tokens (a chain from the adapter's root), so a
match is exact, never a hash collision. The cache is bounded by bytes, least recently used first;
a hit refreshes its chain from the last block to the first, so the blocks that end a chain go
before the ones they need.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16):
        if block < 1:
            raise ValueError("the prefix cache's block must be at least 1 token")
        self.max_bytes, self.block = max_bytes, block
        # (parent entry id, adapter or None, the block's tokens) → (entry id, KV [layers, 2, kv heads,
        # block, head dim]); the root of each adapter's chains is entry id 0.
        self._entries: OrderedDict[tuple, tuple[int, torch.Tensor]] = OrderedDict()
        self._next_id = 1
        self.bytes = 0

    def lookup(self, owner: str | None, prompt: list[int]) -> torch.Tensor | None:
        """The KV of the longest cached beginning of `prompt` that leaves at least its last token
        to compute (a prefill must produce that token's logits): [layers, 2, kv heads, length,
        head dim], or None."""
        keys, found = self._walk(owner, prompt, (len(prompt) - 1) // self.block)
        if not found:
            return None
        for key in reversed(keys):
            self._entries.move_to_end(key)
        return torch.cat(found, dim=3)

    def missing(self, owner: str | None, prompt: list[int]) -> bool:
        """Whether some whole block of `prompt` is not cached (`insert` would add it)."""
        n = len(prompt) // self.block
        return self.max_bytes > 0 and len(self._walk(owner, prompt, n)[1]) < n

    def insert(self, owner: str | None, prompt: list[int], kv: torch.Tensor) -> None:
        """Keep the whole blocks of `prompt` that are not cached yet, given `kv` [layers, 2, kv
        heads, at least its whole blocks' length, head dim]: its keys and values from the start."""
        if self.max_bytes <= 0:
            return
        n = len(prompt) // self.block
        keys, found = self._walk(owner, prompt, n)
        parent = self._entries[keys[-1]][0] if keys else 0
        for j in range(len(found), n):
            part = kv[:, :, :, j * self.block : (j + 1) * self.block].clone()
            if part.nbytes > self.max_bytes:
                break
            key = (parent, owner, tuple(prompt[j * self.block : (j + 1) * self.block]))
            parent, self._next_id = self._next_id, self._next_id + 1
            self._entries[key] = (parent, part)
            self.bytes += part.nbytes
            keys.append(key)
        for key in reversed(keys):
            self._entries.move_to_end(key)
        while self.bytes > self.max_bytes:
            _, (_, part) = self._entries.popitem(last=False)
            self.bytes -= part.nbytes

    def drop(self, owner: str | None) -> None:
        """Forget an adapter's entries (it was unloaded; its files may change before it is back)."""
        for key in [k for k in self._entries if k[1] == owner]:
            self.bytes -= self._entries.pop(key)[1].nbytes

    def _walk(
        self, owner: str | None, prompt: list[int], limit: int
    ) -> tuple[list[tuple], list[torch.Tensor]]:
        keys, found, parent = [], [], 0
        for j in range(limit):
            key = (parent, owner, tuple(prompt[j * self.block : (j + 1) * self.block]))
            entry = self._entries.get(key)
            if entry is None:
                break
            parent = entry[0]
            keys.append(key)
            found.append(entry[1])
        return keys, found
