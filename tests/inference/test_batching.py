"""Step-level batching: requests for different adapters share forward passes and still answer
exactly as they do alone; a request joins a running batch without waiting for it to finish."""

from __future__ import annotations

import queue
import threading

from tests.inference.test_hf_engine import MESSAGES, adapters, greedy, wait_until  # noqa: F401
from tunehouse.inference.engine import Delta, ModelRef, SamplingParams, Usage
from tunehouse.inference.hf import HFEngine


def test_different_adapters_in_one_batch_answer_as_alone(tiny_model_dir, adapters):  # noqa: F811
    a, b = adapters
    refs = [
        ModelRef("tiny", tiny_model_dir),
        ModelRef("ft:a", tiny_model_dir, a),
        ModelRef("ft:b", tiny_model_dir, b),
    ]
    eng = HFEngine()
    try:
        alone = [eng.chat(r, MESSAGES, greedy(12)).choices[0].text for r in refs]
        assert len(set(alone)) == 3, "each adapter changes the output"

        # Hold the scheduler's attention on a long request so the others are admitted into its batch.
        prompt = eng.encode_chat(refs[0], MESSAGES)
        batch_sizes = []
        original = eng.forward

        def spy(base, ids, *args):
            batch_sizes.append(ids.shape[0])
            return original(base, ids, *args)

        eng.forward = spy
        events: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(len(refs) * 2)]
        for i, q in enumerate(events):
            eng.submit(refs[i % 3], prompt, greedy(12), q.put)
        got = []
        for q in events:
            text = ""
            while not isinstance(item := q.get(timeout=300), Usage):
                assert isinstance(item, Delta)
                text += item.text
            got.append(text)
        assert got == alone * 2
        assert max(batch_sizes) > 1, "requests shared forward passes"
        assert wait_until(lambda: eng.active_sequences() == 0)
    finally:
        eng.close()


def test_a_new_request_joins_a_running_batch(tiny_model_dir):
    eng = HFEngine()
    tiny = ModelRef("tiny", tiny_model_dir)
    try:
        long = eng.stream(
            tiny, eng.encode_chat(tiny, MESSAGES), SamplingParams(temperature=1.0, max_tokens=1500, seed=1)
        )
        next(long)
        done = threading.Event()
        result = {}

        def short():
            result["r"] = eng.chat(tiny, MESSAGES, greedy(4))
            done.set()

        threading.Thread(target=short).start()
        assert done.wait(300), "the short request finished while the long one is still running"
        assert result["r"].choices[0].finish_reason == "length"
        assert eng.active_sequences() == 1
        long.close()
        assert wait_until(lambda: eng.active_sequences() == 0)
    finally:
        eng.close()


def test_logit_bias_penalties_and_logprobs(engine, tiny):
    prompt = engine.encode_chat(tiny, MESSAGES)
    token = engine.decode(tiny, [42])
    forced = engine.generate(tiny, prompt, greedy(6, logit_bias={42: 100.0}))
    assert forced.choices[0].text == token * 6

    free = engine.generate(tiny, prompt, greedy(6, logprobs=True))
    first = free.choices[0].logprobs[0]
    first_id = engine.encode_text(tiny, bytes(first.bytes).decode())[0]
    banned = engine.generate(tiny, prompt, greedy(6, logprobs=True, logit_bias={first_id: -100.0}))
    assert banned.choices[0].logprobs[0].token != first.token

    # A strong frequency penalty stops a mildly favoured token from repeating.
    plain = engine.generate(tiny, prompt, greedy(6, logit_bias={42: 8.0}))
    assert plain.choices[0].text == token * 6
    penalized = engine.generate(
        tiny, prompt, greedy(6, logit_bias={42: 8.0}, frequency_penalty=2.0, presence_penalty=2.0)
    )
    assert penalized.choices[0].text.count(token) < 6

    out = engine.generate(
        tiny, prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    )
    entries = out.choices[0].logprobs
    assert len(entries) == out.completion_tokens == 5
    assert "".join(e.token for e in entries) == out.choices[0].text
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the most likely
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token


def test_growing_kv_cache_layer_matches_concatenation():
    import torch
    from transformers.cache_utils import DynamicLayer

    from tunehouse.inference.cache import GrowingLayer

    ours, plain = GrowingLayer(), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    for step, new in enumerate([5, 1, 1, 70, 1]):  # a prompt, decode steps, a growth past capacity
        k, v = torch.randn(2, 3, new, 4, generator=gen), torch.randn(2, 3, new, 4, generator=gen)
        got, want = ours.update(k, v), plain.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), step
        assert ours.get_seq_length() == plain.get_seq_length()
        if step == 2:  # the scheduler drops a row and trims the left: keys first, then values
            ours.keys = ours.keys[1:, :, 2:]
            ours.values = ours.values[1:, :, 2:]
            plain.keys, plain.values = plain.keys[1:, :, 2:], plain.values[1:, :, 2:]
            k2 = torch.randn(1, 3, 1, 4, generator=gen)
            got, want = ours.update(k2, k2), plain.update(k2, k2)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            # Back to two rows for the rest of the test, as a join would.
            ours.keys, ours.values = torch.cat([ours.keys] * 2), torch.cat([ours.values] * 2)
            plain.keys, plain.values = torch.cat([plain.keys] * 2), torch.cat([plain.values] * 2)


def test_greedy_answers_equal_plain_transformers_generate_alone_and_left_padded(default_model_dir):
    """The engine against the reference: fp32 greedy, prompts of different lengths prefilled together
    (left padding) and then decoded step by step, each equal to transformers' own `generate`. The
    real model, because the tiny random one's flat logits hide small errors (an off-by-one position
    id passed here with the tiny model)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [
        [{"role": "user", "content": "Hi"}],
        MESSAGES,
        [{"role": "user", "content": "Write a long, careful answer about invoices and refunds."}],
    ]
    eng = HFEngine(dtype="float32")
    ref = ModelRef("smollm2-135m-instruct", default_model_dir)
    try:
        encoded = [eng.encode_chat(ref, m) for m in prompts]
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
        expected = []
        for ids in encoded:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
            new = out[0, len(ids) :].tolist()
            eos = model.generation_config.eos_token_id
            new = new[: new.index(eos)] if eos in new else new  # the end of turn is not text
            expected.append(eng.decode(ref, new))
        params = SamplingParams(temperature=0, max_tokens=10)
        alone = [eng.chat(ref, m, params).choices[0].text for m in prompts]
        assert alone == expected

        events = [queue.SimpleQueue() for _ in encoded]
        for ids, q in zip(encoded, events, strict=True):
            eng.submit(ref, ids, params, q.put)
        together = []
        for q in events:
            text = ""
            while not isinstance(item := q.get(timeout=300), Usage):
                text += item.text
            together.append(text)
        assert together == expected
    finally:
        eng.close()
