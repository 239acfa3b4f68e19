"""Prefix caching: the cache itself, and the engine's answers with it equal to its answers without."""

from __future__ import annotations

import time
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


def test_one_prefill_of_rows_with_cached_beginnings_of_every_length_answers_as_without(tiny_model_dir):
    """Admission held until four requests wait, so one prefill takes them all: a whole prompt
    cached but its last token, the system prompt only (twice, rests of different lengths), and
    nothing (another system prompt): `[pad, cached, pad, rest]` rows of every shape, each
    answering as the engine does with the cache off."""
    base = ModelRef("tiny", tiny_model_dir)
    other = {"role": "system", "content": "Be brief."}
    chats = [
        [SYSTEM, {"role": "user", "content": QUESTIONS[1] * 3}],
        [SYSTEM, {"role": "user", "content": QUESTIONS[2]}],
        [other, {"role": "user", "content": QUESTIONS[0]}],
        [SYSTEM, {"role": "user", "content": QUESTIONS[3] * 2}],
    ]
    # The tiny model's greedy text is often a run of newlines: its log probabilities (of the
    # five likeliest tokens at each step) tell a wrong cache apart.
    params = greedy(8, logprobs=True, top_logprobs=5)

    def answer(engine: HFEngine, chat: list[dict]) -> tuple[str, list[float]]:
        choice = engine.chat(base, chat, params).choices[0]
        return choice.text, [top.logprob for entry in choice.logprobs for top in entry.top_logprobs]

    reference = HFEngine(dtype="float32", prefix_cache_mb=0)
    try:
        expected = [answer(reference, chat) for chat in chats]
    finally:
        reference.close()

    engine = HFEngine(dtype="float32")
    try:
        assert answer(engine, chats[0])[0] == expected[0][0]  # and now it is cached
        prefix = engine._bases[str(tiny_model_dir.resolve())].prefix
        looked_up: dict[tuple[int, ...], int] = {}  # prompt → tokens found cached
        scheduler = engine.scheduler
        lookup, admit = prefix.lookup, scheduler._admit

        def spy_lookup(owner, prompt):
            hit = lookup(owner, prompt)
            looked_up[tuple(prompt)] = 0 if hit is None else hit.shape[3]
            return hit

        def held_admit():  # the scheduler thread: wait for all four, then admit them together
            if scheduler._waiting or not scheduler._incoming.empty():
                deadline = time.monotonic() + 30
                while len(scheduler._waiting) + scheduler._incoming.qsize() < len(chats):
                    assert time.monotonic() < deadline, "the requests did not arrive"
                    time.sleep(0.001)
                while not scheduler._incoming.empty():
                    scheduler._waiting.append(scheduler._incoming.get_nowait())
            admit()

        prefix.lookup, scheduler._admit = spy_lookup, held_admit
        with ThreadPoolExecutor(len(chats)) as pool:
            got = list(pool.map(lambda chat: answer(engine, chat), chats))
        for (text, logprobs), (want_text, want_logprobs) in zip(got, expected, strict=True):
            assert text == want_text
            assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
        prompts = [engine.encode_chat(base, chat) for chat in chats]
        assert len(looked_up) == len(chats)  # one prefill
        found = [looked_up[tuple(prompt)] for prompt in prompts]
        assert found[0] == (len(prompts[0]) - 1) // 16 * 16  # the whole first prompt but its last token
        assert 0 < found[1] == found[3] < found[0] and found[2] == 0
    finally:
        engine.close()


def test_a_negative_prefix_cache_size_is_refused():
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        HFEngine(prefix_cache_mb=-1)
