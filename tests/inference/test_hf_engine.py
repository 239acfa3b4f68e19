"""The transformers engine on the tiny random model (CPU, seconds), plus one check on the real default model."""

from __future__ import annotations

import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tunehouse.inference.detokenize import IncrementalDetokenizer
from tunehouse.inference.engine import (
    ChatResult,
    ContextLengthExceeded,
    Delta,
    InferenceEngine,
    ModelRef,
    SamplingParams,
    Usage,
)
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.sampling import argmax_rows

MESSAGES = [{"role": "user", "content": "Tell me something."}]


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def texts(result: ChatResult) -> list[str]:
    return [c.text for c in result.choices]


def make_adapter(base_dir: Path, out: Path, targets: list[str], seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter change the outputs
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(tiny_model_dir, root / "a", ["q_proj", "v_proj"], seed=1)
    b = make_adapter(tiny_model_dir, root / "b", ["o_proj", "down_proj", "up_proj"], seed=2)
    return a, b


@pytest.mark.parametrize("width", [100, 2048, 3000, 49152, 49153])
def test_argmax_rows_equals_torch_argmax(width):
    import torch

    gen = torch.Generator().manual_seed(width)
    logits = torch.randn(6, width, generator=gen).mul_(4).round_()  # many equal values: ties
    logits[1] = float("-inf")  # a row where everything is banned
    logits[2, width // 2] = float("nan")
    logits[3, width - 1] = 100.0  # the maximum in the last, partial block
    logits[4, 0] = logits[4, width - 1] = 100.0  # tied maxima: the first wins
    logits[5, 1024 if width > 2048 else 0] = 100.0  # the first column of a block
    assert torch.equal(argmax_rows(logits, block=1024), logits.argmax(dim=-1))


def test_engine_implements_every_method_of_the_interface(engine, tiny):
    """HFEngine subclasses the InferenceEngine protocol, so `isinstance` holds whatever it defines:
    a method it lacks is silently the protocol's stub, which returns None. Each one must be the
    engine's own, taking the protocol's parameters; and the two no other test here calls work."""
    methods = [name for name, f in vars(InferenceEngine).items() if inspect.isfunction(f) and name[0] != "_"]
    assert "submit" in methods and "close" in methods
    for name in methods:
        ours, declared = getattr(HFEngine, name), getattr(InferenceEngine, name)
        assert ours is not declared, f"HFEngine.{name} is the protocol's stub"
        params = [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()]
        assert params == [(p.name, p.kind) for p in inspect.signature(declared).parameters.values()], name
    ids = engine.encode_text(tiny, "Hello there, world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert engine.decode(tiny, ids) == "Hello there, world"


def test_greedy_is_deterministic_and_counts_tokens(engine, tiny):
    first = engine.chat(tiny, MESSAGES, greedy(12))
    second = engine.chat(tiny, MESSAGES, greedy(12))
    assert texts(first) == texts(second)
    assert first.prompt_tokens == engine.count_prompt_tokens(tiny, MESSAGES)
    assert first.choices[0].text


def test_prompt_uses_the_chat_template(engine, tiny, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=True,
        add_generation_prompt=True,
    )
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert engine.count_prompt_tokens(tiny, messages) == len(expected)


def test_seed_reproducible_with_sampling(engine, tiny):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234)
    a = engine.chat(tiny, MESSAGES, params)
    b = engine.chat(tiny, MESSAGES, params)
    c = engine.chat(tiny, MESSAGES, SamplingParams(temperature=1.0, max_tokens=12, seed=4321))
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_max_tokens_gives_length(engine, tiny):
    result = engine.chat(tiny, MESSAGES, greedy(5))
    assert result.choices[0].finish_reason == "length"
    assert result.completion_tokens == 5


def test_stop_string_cuts_the_text(engine, tiny):
    full = engine.chat(tiny, MESSAGES, greedy(24)).choices[0].text
    assert len(full) > 10
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    result = engine.chat(tiny, MESSAGES, greedy(24, stop=["never-appears", stop]))
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]
    assert result.completion_tokens < 24  # generation stopped early


def test_n_choices(engine, tiny):
    result = engine.chat(tiny, MESSAGES, SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7))
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len(set(texts(result))) > 1
    assert result.completion_tokens == 24
    same = engine.chat(tiny, MESSAGES, greedy(8, n=3))
    assert len(same.choices) == 3 and len(set(texts(same))) == 1
    assert same.completion_tokens == 3 * 8


def collect(stream) -> tuple[dict[int, str], dict[int, str], list]:
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    usages = []
    for item in stream:
        if isinstance(item, Usage):
            usages.append(item)
            continue
        assert isinstance(item, Delta)
        assert not usages, "Usage must come last"
        assert item.index not in finish, "nothing after a choice's finish_reason"
        text[item.index] = text.get(item.index, "") + item.text
        if item.finish_reason is not None:
            finish[item.index] = item.finish_reason
    return text, finish, usages


def test_stream_matches_non_streaming(engine, tiny):
    for params in (
        greedy(20),
        greedy(24, stop=["e"]),
        greedy(6, n=2),
        SamplingParams(max_tokens=10, n=3, seed=3),
    ):
        result = engine.chat(tiny, MESSAGES, params)
        text, finish, usages = collect(engine.chat_stream(tiny, MESSAGES, params))
        assert [text.get(i, "") for i in range(params.n)] == texts(result)
        assert [finish[i] for i in range(params.n)] == [c.finish_reason for c in result.choices]
        assert usages == [
            Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        ]


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_closing_a_stream_stops_generation(engine, tiny):
    stream = engine.chat_stream(tiny, MESSAGES, SamplingParams(temperature=1.0, max_tokens=1500))
    pieces = [next(stream) for _ in range(3)]
    assert all(isinstance(p, Delta) for p in pieces)
    assert engine.active_sequences() == 1
    stream.close()
    assert wait_until(lambda: engine.active_sequences() == 0), "the slot is freed"
    assert engine.chat(tiny, MESSAGES, greedy(3)).choices[0].finish_reason == "length"


def test_context_length(engine, tiny):
    long = [{"role": "user", "content": "hello " * 2100}]
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 2048"):
        engine.chat(tiny, long, SamplingParams())
    with pytest.raises(ContextLengthExceeded, match="too many"):
        engine.chat_stream(tiny, MESSAGES, greedy(2040))  # raised before any iteration


def test_adapters_change_outputs_and_do_not_leak(tiny_model_dir, adapters):
    a, b = adapters
    base = ModelRef("tiny", tiny_model_dir)
    ft_a = ModelRef("ft:a", tiny_model_dir, a)
    ft_b = ModelRef("ft:b", tiny_model_dir, b)
    params = greedy(12)

    def alone(ref: ModelRef) -> str:
        eng = HFEngine()
        try:
            return eng.chat(ref, MESSAGES, params).choices[0].text
        finally:
            eng.close()

    expected = {ref: alone(ref) for ref in (base, ft_a, ft_b)}
    assert len(set(expected.values())) == 3, "each adapter changes the output"

    eng = HFEngine()
    order = [base, ft_a, base, ft_b, ft_a, base, ft_b]
    assert [eng.chat(r, MESSAGES, params).choices[0].text for r in order] == [expected[r] for r in order]
    streamed, _, _ = collect(eng.chat_stream(ft_b, MESSAGES, params))
    assert streamed[0] == expected[ft_b]

    # From several threads at once: the lock keeps each request on its own adapter.
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: eng.chat(r, MESSAGES, params).choices[0].text, order * 2))
    assert got == [expected[r] for r in order * 2]
    eng.close()

    # LRU with room for one adapter: evicted adapters are reloaded and still answer the same.
    small = HFEngine(max_adapters=1)
    order = [ft_a, ft_b, ft_a, base, ft_b, ft_a]
    assert [small.chat(r, MESSAGES, params).choices[0].text for r in order] == [expected[r] for r in order]
    state = small._bases[str(tiny_model_dir.resolve())]
    assert list(state.adapters) == [str(a.resolve())]
    # Exactly one slot holds an adapter: the evicted ones were cleared and their slots freed.
    held = [slot for slot in range(state.lora.n_slots) if slot not in state.lora.free]
    assert held == [state.adapters[str(a.resolve())]]
    small.close()


def test_missing_adapter(engine, tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        engine.chat(ModelRef("ft:x", tiny_model_dir, tmp_path / "nope"), MESSAGES, greedy(2))


@pytest.mark.parametrize("text", ["Grüße, 東京 and emoji 🐉🔥 — done", "naïve café ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "plain ascii"])
def test_incremental_decoding_across_multibyte_tokens(tiny_model_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    row = IncrementalDetokenizer(tok, [], frozenset({tok.eos_token_id}))
    pieces = []
    for i in ids:
        row.push(i)
        piece = row.take()
        assert "\ufffd" not in piece
        pieces.append(piece)
    row.push(tok.eos_token_id)
    pieces.append(row.take())
    assert "".join(pieces) == text
    assert row.finish_reason == "stop" and row.completion_tokens == len(ids)


def test_stop_strings_never_leak_into_the_stream(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The answer is 42. END OF ANSWER and more"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    row = IncrementalDetokenizer(tok, ["END OF ANSWER", "xyz"], frozenset({tok.eos_token_id}))
    streamed = ""
    for i in ids:
        row.push(i)
        streamed += row.take()
        if row.finish_reason:
            break
    assert row.finish_reason == "stop"
    assert streamed == row.text == "The answer is 42. "


def test_real_default_model_answers(default_model_dir: Path):
    eng = HFEngine()
    try:
        ref = ModelRef("smollm2-135m-instruct", default_model_dir)
        result = eng.chat(ref, [{"role": "user", "content": "What is the capital of France?"}], greedy(32))
        assert "Paris" in result.choices[0].text
        assert result.choices[0].finish_reason == "stop"
    finally:
        eng.close()
