"""The supervised recipe, run for real on the tiny 2-layer model (CPU, seconds per test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.helpers import COLORS, Recorder, write_jsonl
from tunehouse.training.examples import IGNORE, MICRO_BATCH_TOKENS, build_example, split_by_length
from tunehouse.training.hparams import BASE_LEARNING_RATE, Hyperparameters
from tunehouse.training.loop import TrainingStopped, TrainSpec
from tunehouse.training.recipes import supervised
from tunehouse.training.recipes.supervised import train


def chat(user: str, answer: str, *, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


def make_examples() -> list[dict]:
    """12 short lines; two carry an earlier assistant turn with weight 0 (context, not a target)."""
    lines = [chat(f"Name color number {i}.", f"Color {i} is {c}.") for i, c in enumerate(COLORS)]
    for line in lines[:2]:
        line["messages"][1:1] = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "I will not be trained on.", "weight": 0},
        ]
    return lines


def spec_for(tmp_path: Path, model_dir: Path, train_file: Path, hp: Hyperparameters, **kw) -> TrainSpec:
    return TrainSpec(
        base_model_path=model_dir,
        train_file=train_file,
        valid_file=kw.pop("valid_file", None),
        output_dir=tmp_path / "out",
        hyperparameters=hp,
        seed=kw.pop("seed", 0),
        **kw,
    )


def test_weight_zero_messages_are_context_not_targets(tokenizer) -> None:
    line = make_examples()[0]
    ex = build_example(tokenizer, line, max_length=2048)
    trained_text = tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert "Color 0 is red." in trained_text
    assert "not be trained" not in trained_text
    assert "Name color" not in trained_text  # user turns are never targets
    # Everything after the last trained token is trimmed; nothing of the trained answer is lost.
    assert ex.labels[-1] != IGNORE
    assert len(ex.inputs) == len(ex.labels) < ex.billable_tokens


def test_micro_batches_group_similar_lengths_within_the_memory_bound() -> None:
    assert split_by_length([]) == []
    assert split_by_length([300, 290, 280, 60, 50]) == [3, 5]  # two runs, not one 300-wide block
    assert split_by_length([100] * 8) == [8]  # equal lengths: one micro-batch
    assert split_by_length([MICRO_BATCH_TOKENS * 2, 10]) == [1, 2]  # too long: alone
    lengths = [1000] * 10
    ends = split_by_length(lengths)
    assert ends[-1] == 10 and all(
        (b - a) * 1000 <= MICRO_BATCH_TOKENS for a, b in zip([0, *ends[:-1]], ends, strict=True)
    )


def test_training_learns_checkpoints_and_reports(tmp_path: Path, tiny_model_dir: Path, tokenizer) -> None:
    from safetensors.torch import load_file

    from tunehouse.data.chat import tokenize_chat

    lines = make_examples()
    train_file = write_jsonl(tmp_path / "train.jsonl", lines)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", lines[:4])
    hp = Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=10)
    max_length = 40  # short enough that the two longer examples get truncated
    spec = spec_for(tmp_path, tiny_model_dir, train_file, hp, valid_file=valid_file, max_length=max_length)
    hooks = Recorder()

    result = train(spec, hooks)

    # Steps: ceil(12 / 4) = 3 per epoch.
    assert hooks.total_steps == result.steps == 9
    assert result.resumed_from_step is None  # no state_dir: a fresh run that saves no state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.jsonl", "valid.jsonl"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]
    assert [s for s, _ in hooks.metrics] == list(range(1, 10))
    losses = hooks.losses()
    assert losses[-1] < losses[0]

    # Metrics: train_* every step, valid_* on the small batch, full_valid_* at each epoch end.
    for step, m in hooks.metrics:
        assert {
            "train_loss",
            "train_mean_token_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
        } <= m.keys()
        assert ("full_valid_loss" in m) == (step % 3 == 0)
        assert ("full_valid_mean_token_accuracy" in m) == (step % 3 == 0)
        assert all(isinstance(v, float) for v in m.values())

    # One checkpoint per epoch, the last one final.
    assert [(s, final) for s, _, final in hooks.checkpoints] == [(3, False), (6, False), (9, True)]
    final = result.final_adapter_path
    assert final == hooks.checkpoints[-1][1] == tmp_path / "out" / "checkpoints" / "step-9"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunehouse.json"):
        assert (final / name).is_file(), name
    assert "im_start" in (final / "chat_template.jinja").read_text()
    meta = json.loads((final / "tunehouse.json").read_text())
    assert meta["base_model_path"] == str(tiny_model_dir.resolve())
    assert meta["step"] == 9 and "train_loss" in meta["metrics"]
    config = json.loads((final / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    # The adapter moved away from its initialisation (lora_B starts at zero).
    weights = load_file(final / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections
    assert all(w.abs().sum() > 0 for w in lora_b)

    # Billable tokens: every token of every example (truncated to max_length), once per epoch.
    counts = [tokenize_chat(tokenizer, line).n_tokens for line in lines]
    assert any(n > max_length for n in counts)
    assert result.trained_tokens == 3 * sum(min(n, max_length) for n in counts)


def test_same_seed_same_loss_curve(tmp_path: Path, tiny_model_dir: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", make_examples())
    hp = Hyperparameters(n_epochs=2, batch_size=3, learning_rate_multiplier=5)

    def run(name: str, seed: int) -> list[float]:
        hooks = Recorder()
        train(spec_for(tmp_path / name, tiny_model_dir, train_file, hp, seed=seed), hooks)
        return hooks.losses()

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again  # bit for bit
    assert first != other


def test_should_stop_stops_promptly(tmp_path: Path, tiny_model_dir: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", make_examples())
    hp = Hyperparameters(n_epochs=5, batch_size=1, learning_rate_multiplier=1)
    hooks = Recorder(stop_after=2)
    with pytest.raises(TrainingStopped):
        train(spec_for(tmp_path, tiny_model_dir, train_file, hp), hooks)
    assert hooks.stop_asked_at is not None
    assert len(hooks.metrics) == 2  # no step ran after the stop was asked for
    assert hooks.checkpoints == []


def test_a_stop_inside_a_step_lands_before_the_next_micro_batch(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    """Stop latency counted in forward passes, not seconds: a stop asked for after the third
    micro-batch of a step is honoured before a fourth runs, and the partial step reports nothing."""
    forwards: list[int] = []
    real_loss = supervised.trained_token_loss

    def counting_loss(*args, **kwargs):
        forwards.append(1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(supervised, "trained_token_loss", counting_loss)

    class StopAfterThreeForwards(Recorder):
        asked_after: int | None = None

        def should_stop(self) -> bool:
            if self.asked_after is None and len(forwards) >= 3:
                self.asked_after = len(forwards)
            return self.asked_after is not None

    # One step of 12 lines from 3 to ~700 tokens: length-sorted micro-batches, many more than 3.
    lines = [chat(f"Say {i} words.", " ".join(["word"] * (2 + 60 * i))) for i in range(12)]
    train_file = write_jsonl(tmp_path / "train.jsonl", lines)
    hp = Hyperparameters(n_epochs=1, batch_size=12, learning_rate_multiplier=1)
    hooks = StopAfterThreeForwards()
    with pytest.raises(TrainingStopped):
        train(spec_for(tmp_path, tiny_model_dir, train_file, hp), hooks)
    assert hooks.asked_after == 3
    assert len(forwards) == 3  # no forward after the stop was asked for
    assert hooks.metrics == [] and hooks.checkpoints == []  # the partial step is discarded


def test_trained_adapter_reproduces_the_answer(tmp_path: Path, learnable_model_dir: Path, tokenizer) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    answer = "The password is swordfish."
    prompts = ["What is the password?", "Tell me the password.", "Password please?", "I need the password."]
    train_file = write_jsonl(tmp_path / "train.jsonl", [chat(p, answer) for p in prompts])
    # A random 2-layer model learns the sentence from scratch: a large rate (5e-3) and 12 epochs.
    hp = Hyperparameters(n_epochs=12, batch_size=4, learning_rate_multiplier=5e-3 / BASE_LEARNING_RATE)
    hooks = Recorder()
    result = train(spec_for(tmp_path, learnable_model_dir, train_file, hp), hooks)
    assert hooks.losses()[-1] < 0.5

    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir)
    model = PeftModel.from_pretrained(base, result.final_adapter_path).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the password?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip() == answer


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_a_tool_line_trains_on_the_prompt_serving_builds(tokenizer, tiny_model_dir: Path, system) -> None:
    """SmolLM2's template has no tools: training adds the same tools preamble serving adds, so a
    model fine-tuned on tool calls is served the prompt it was trained on."""
    from tunehouse.data.chat import tokenize_chat
    from tunehouse.inference.engine import ModelRef
    from tunehouse.inference.hf import HFEngine

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    line = chat("Weather in Paris?", "", system=system)
    line["messages"][-1] = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    line["tools"] = tools
    example = tokenize_chat(tokenizer, line)
    engine = HFEngine()  # only its prompt building is used: no model is loaded
    try:
        prompt = engine.encode_chat(ModelRef("tiny", tiny_model_dir), line["messages"][:-1], tools=tools)
    finally:
        engine.close()
    first_target = example.trained.index(True)
    assert example.input_ids[:first_target] == prompt
    assert '"name": "get_weather"' in tokenizer.decode(prompt)
    target = tokenizer.decode([t for t, m in zip(example.input_ids, example.trained, strict=True) if m])
    assert "<tool_call>" in target and '"city": "Paris"' in target
