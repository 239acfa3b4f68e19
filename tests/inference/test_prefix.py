"""Prefix caching: the cache itself, and the engine's answers with it equal to its answers without."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.inference.test_hf_engine import adapters, greedy  # noqa: F401 (a fixture)
from tunehouse.inference.engine import ModelRef, SamplingParams
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.prefix import PrefixCache


def kv_of(prompt: list[int]) -> torch.Tensor:
    """A stand-in KV [layers 2, 2, heads 1, positions, dim 3] whose values name their token."""
    return torch.tensor(prompt, dtype=torch.float32)[None, None, None, :, None].expand(2, 2, 1, -1, 3).clone()


def test_a_lookup_gives_the_longest_cached_beginning_but_leaves_the_last_token():
    cache = PrefixCache(max_bytes=10**6, block=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 whole blocks
    assert cache.lookup(None, prompt) is None
    cache.insert(None, prompt, kv_of(prompt))
    assert cache.bytes == 2 * kv_of(prompt[:4]).nbytes

    hit = cache.lookup(None, prompt)
    assert hit.shape == (2, 2, 1, 8, 3)
    assert torch.equal(hit, kv_of(prompt[:8]))
    assert cache.lookup(None, prompt[:9]).shape[3] == 8  # the 9th token is left to compute
    assert cache.lookup(None, prompt[:8]).shape[3] == 4  # all 8 cached, but the 8th must be computed
    assert cache.lookup(None, prompt[:4]) is None
    assert cache.lookup(None, [*prompt[:4], 0, 0, 0, 0, 0]).shape[3] == 4  # the first block only


def test_a_block_matches_only_after_the_same_blocks_and_for_the_same_adapter():
    cache = PrefixCache(max_bytes=10**6, block=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    cache.insert("adapter-a", prompt, kv_of(prompt))
    assert cache.lookup(None, prompt) is None  # the base model's keys and values differ
    assert cache.lookup("adapter-b", prompt) is None
    assert cache.lookup("adapter-a", [0, 2, 3, 4, 5, 6, 7, 8, 9]) is None  # same 2nd block, other 1st
    assert cache.lookup("adapter-a", prompt).shape[3] == 8
    assert not cache.missing("adapter-a", prompt)
    assert cache.missing("adapter-a", [*prompt[:8], 10, 11, 12, 13])

    cache.insert(None, prompt, kv_of(prompt))
    cache.drop("adapter-a")
    assert cache.lookup("adapter-a", prompt) is None
    assert cache.lookup(None, prompt).shape[3] == 8
    assert cache.bytes == 2 * kv_of(prompt[:4]).nbytes


def test_the_cache_stays_within_its_bytes_least_recently_used_out_first():
    block_bytes = kv_of([0] * 4).nbytes
    cache = PrefixCache(max_bytes=3 * block_bytes, block=4)
    first, second = list(range(9)), list(range(50, 59))
    cache.insert(None, first, kv_of(first))
    cache.insert(None, second, kv_of(second))  # 4 blocks: one of `first`'s goes, its last first
    assert cache.bytes == 3 * block_bytes
    assert cache.lookup(None, first).shape[3] == 4
    assert cache.lookup(None, second).shape[3] == 8
    cache.lookup(None, first)  # now `second` is the least recently used
    third = list(range(90, 95))
    cache.insert(None, third, kv_of(third))
    assert cache.bytes == 3 * block_bytes
    assert cache.lookup(None, first).shape[3] == 4
    assert cache.lookup(None, third).shape[3] == 4
    assert cache.lookup(None, second).shape[3] == 4  # its second block went, its first stayed

    assert PrefixCache(max_bytes=0).missing(None, list(range(40))) is False  # off: never adds


SYSTEM = {"role": "system", "content": "You answer questions about the weather, in short sentences. " * 4}
QUESTIONS = ["Is it cold?", "Will it rain tomorrow in the hills?", "Wind?", "What should I wear today?"]


def test_answers_with_the_prefix_cache_equal_answers_without(tiny_model_dir, adapters):  # noqa: F811
    """Requests that share a long system prompt, to the base and two adapters, several at once (so
    one prefill mixes rows with cached beginnings of different lengths and rows without), greedy
    and seeded sampling with n=2: every answer is the one the engine gives with the cache off."""
    refs = [ModelRef("tiny", tiny_model_dir)] + [
        ModelRef(f"ft:{i}", tiny_model_dir, path) for i, path in enumerate(adapters)
    ]
    requests = [(ref, question) for question in QUESTIONS for ref in refs] * 2
    sampled = SamplingParams(temperature=0.9, max_tokens=8, seed=7, n=2)

    def answers(engine: HFEngine) -> list[list[str]]:
        def ask(request, params):
            ref, question = request
            result = engine.chat(ref, [SYSTEM, {"role": "user", "content": question}], params)
            return [c.text for c in result.choices]

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda r: ask(r, greedy(8)), requests))
            got += list(pool.map(lambda r: ask(r, sampled), requests))
        return got

    without = HFEngine(dtype="float32", prefix_cache_mb=0)
    try:
        expected = answers(without)
    finally:
        without.close()
    engine = HFEngine(dtype="float32")
    try:
        assert answers(engine) == expected
        prefix = engine._bases[str(tiny_model_dir.resolve())].prefix
        owners = {key[1] for key in prefix._entries}
        assert owners == {None, *(str(p.resolve()) for p in adapters)}
        assert 0 < prefix.bytes <= prefix.max_bytes
    finally:
        engine.close()


def test_a_negative_prefix_cache_size_is_refused():
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        HFEngine(prefix_cache_mb=-1)
