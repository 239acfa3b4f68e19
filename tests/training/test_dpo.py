"""The DPO recipe, run for real on the tiny 2-layer model (CPU, seconds per test)."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.training.helpers import Recorder, write_jsonl
from tunehouse.training.examples import IGNORE
from tunehouse.training.hparams import (
    DpoHyperparameters,
    Hyperparameters,
    auto_beta,
    resolve_dpo_hyperparameters,
    resolve_hyperparameters,
)
from tunehouse.training.recipes.dpo import (
    DpoSpec,
    TrainingStopped,
    build_pair,
    pair_batches,
    reference_logps,
    sequence_logps,
    train,
)

PREFERRED = "Yes."
REJECTED = "No way, never."
QUESTIONS = [
    "Is the sky blue?",
    "Can fish swim?",
    "Do birds fly?",
    "Is water wet?",
    "Is fire hot?",
    "Is snow cold?",
    "Do cats purr?",
    "Is grass green?",
    "Do bees buzz?",
    "Is ice solid?",
]


def pair(question: str, *, history: bool = False) -> dict:
    messages = [{"role": "user", "content": question}]
    if history:
        messages[0:0] = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Earlier answer, context only."},
        ]
    return {
        "input": {"messages": messages},
        "preferred_output": [{"role": "assistant", "content": PREFERRED}],
        "non_preferred_output": [{"role": "assistant", "content": REJECTED}],
    }


def make_pairs() -> list[dict]:
    lines = [pair(q) for q in QUESTIONS]
    lines[0] = pair(QUESTIONS[0], history=True)
    return lines


def spec_for(tmp_path: Path, model_dir: Path, train_file: Path, hp, **kw) -> DpoSpec:
    return DpoSpec(
        base_model_path=model_dir,
        train_file=train_file,
        valid_file=kw.pop("valid_file", None),
        output_dir=tmp_path / "out",
        hyperparameters=hp,
        seed=kw.pop("seed", 0),
        **kw,
    )


def test_beta_rule_and_dpo_hyperparameters() -> None:
    assert auto_beta() == 0.1
    hp = resolve_dpo_hyperparameters({}, 50)
    plain = resolve_hyperparameters({}, 50)
    assert isinstance(hp, DpoHyperparameters) and hp.beta == 0.1
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (
        plain.n_epochs,
        plain.batch_size,
        plain.learning_rate_multiplier,
    )
    assert hp.to_dict()["beta"] == 0.1 and hp.learning_rate == plain.learning_rate
    assert resolve_dpo_hyperparameters({"beta": "auto", "n_epochs": 2}, 50).n_epochs == 2
    assert resolve_dpo_hyperparameters({"beta": 2}, 50).beta == 2.0
    for bad in (0, -0.1, 2.01, "x", True, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            resolve_dpo_hyperparameters({"beta": bad}, 50)
    # The spec takes beta from DpoHyperparameters, or auto, and refuses a contradiction.
    assert spec_for(Path("/x"), Path("/m"), Path("/t"), hp).beta == 0.1
    assert spec_for(Path("/x"), Path("/m"), Path("/t"), plain, beta=0.5).beta == 0.5
    assert spec_for(Path("/x"), Path("/m"), Path("/t"), plain).beta == 0.1
    with pytest.raises(ValueError):
        spec_for(Path("/x"), Path("/m"), Path("/t"), hp, beta=0.5)
    with pytest.raises(ValueError):
        spec_for(Path("/x"), Path("/m"), Path("/t"), plain, beta=3)
    with pytest.raises(ValueError, match="fine_tuning_type"):
        spec_for(Path("/x"), Path("/m"), Path("/t"), hp, fine_tuning_type="qlora")


def test_only_the_final_answer_is_trained(tokenizer) -> None:
    p = build_pair(tokenizer, pair("Is the sky blue?", history=True), max_length=2048)
    for ex, answer in ((p.chosen, PREFERRED), (p.rejected, REJECTED)):
        trained = tokenizer.decode([t for t in ex.labels if t != IGNORE])
        assert answer in trained
        assert "Earlier answer" not in trained and "sky" not in trained
    assert p.trainable


def test_reference_is_the_base_model(tokenizer, tiny_model_dir: Path) -> None:
    """Adapter disabled == the plain base model, even with a non-zero adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pairs = [build_pair(tokenizer, line, 2048) for line in make_pairs()[:4]]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.5)
    base = model.get_base_model()
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    reference_logps(model, decoder, lm_head, pairs, 0, device="cpu", autocast=nullcontext())
    assert model.training  # restored

    def full_logp(ex) -> float:  # the textbook way: full logits, log_softmax, gather
        with torch.no_grad():
            logits = plain(torch.tensor([ex.inputs])).logits[0].float()
        labels = torch.tensor(ex.labels)
        keep = labels != IGNORE
        return logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum().item()

    for p in pairs:
        assert p.ref_chosen == pytest.approx(full_logp(p.chosen), abs=1e-3)
        assert p.ref_rejected == pytest.approx(full_logp(p.rejected), abs=1e-3)
    # ... and the adapter does change the policy.
    inputs, labels, chunk, _ = next(pair_batches(pairs, 0))
    with torch.no_grad():
        policy = sequence_logps(base.get_decoder(), base.get_output_embeddings(), inputs, labels)
    assert abs(policy[0].item() - chunk[0].ref_chosen) > 1e-2


def test_dpo_learns_the_preference(tmp_path: Path, learnable_model_dir: Path, tokenizer) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunehouse.data.analysis import analyze
    from tunehouse.data.chat import tokenize_chat
    from tunehouse.data.validation import validate_file

    lines = make_pairs()
    train_file = write_jsonl(tmp_path / "train.jsonl", lines)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", [pair("Is salt salty?"), pair("Do dogs bark?")])
    # The base rate (2e-4) and beta 0.5: the margin grows over the run rather than in one step.
    hp = DpoHyperparameters(n_epochs=3, batch_size=5, learning_rate_multiplier=1, beta=0.5)
    max_length = 45  # truncates the rejected answer of the longer first pair by two tokens
    spec = spec_for(
        tmp_path, learnable_model_dir, train_file, hp, valid_file=valid_file, max_length=max_length
    )
    hooks = Recorder()

    result = train(spec, hooks)

    assert hooks.total_steps == result.steps == 6
    assert [s for s, _ in hooks.metrics] == list(range(1, 7))
    first, last = hooks.metrics[0][1], hooks.metrics[-1][1]
    # Step 1 is measured before any update: policy == reference (lora_B = 0), so loss = log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["train_reward_margin"] == pytest.approx(0, abs=1e-4)
    # Learning: loss falls, the margin grows, the chosen reward beats the rejected one.
    assert last["train_loss"] < first["train_loss"] - 0.3
    epoch_ends = [m for step, m in hooks.metrics if step % 2 == 0]
    margins = [m["train_reward_margin"] for m in epoch_ends]
    assert margins == sorted(margins) and margins[0] > 0.2 and margins[-1] > 1.0, margins
    losses = [m["train_loss"] for m in epoch_ends]
    assert losses == sorted(losses, reverse=True), losses
    assert last["train_rewards_chosen"] > last["train_rewards_rejected"]
    assert last["train_mean_token_accuracy"] == 1.0
    for step, m in hooks.metrics:
        assert {"valid_loss", "valid_mean_token_accuracy"} <= m.keys()
        assert ("full_valid_loss" in m) == (step % 2 == 0)
        assert all(isinstance(v, float) for v in m.values())
    assert last["full_valid_loss"] < math.log(2)  # generalises to unseen questions

    # One checkpoint per epoch, same layout as supervised, the last one final.
    assert [(s, final) for s, _, final in hooks.checkpoints] == [(2, False), (4, False), (6, True)]
    final = result.final_adapter_path
    assert final == hooks.checkpoints[-1][1] == tmp_path / "out" / "checkpoints" / "step-6"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunehouse.json"):
        assert (final / name).is_file(), name
    meta = json.loads((final / "tunehouse.json").read_text())
    assert meta["method"] == "dpo" and meta["hyperparameters"]["beta"] == 0.5
    assert meta["base_model_path"] == str(learnable_model_dir.resolve())
    lora_b = [w for n, w in load_file(final / "adapter_model.safetensors").items() if "lora_B" in n]
    assert len(lora_b) == 2 * 7 and all(w.abs().sum() > 0 for w in lora_b)

    # Independently: the trained policy prefers the preferred answer more than the reference does.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(learnable_model_dir), final).eval()
    base = model.get_base_model()
    pairs = [build_pair(tokenizer, line, max_length) for line in lines]
    inputs, labels, chunk, _ = next(pair_batches(pairs, 0))
    k = len(chunk)
    with torch.no_grad():
        policy = sequence_logps(base.get_decoder(), base.get_output_embeddings(), inputs, labels)
        with model.disable_adapter():
            ref = sequence_logps(base.get_decoder(), base.get_output_embeddings(), inputs, labels)
    policy_gap, ref_gap = policy[:k] - policy[k:], ref[:k] - ref[k:]
    assert bool((policy_gap > ref_gap + 1.0).all()), (policy_gap, ref_gap)

    # Billable: tokens of prompt+preferred and prompt+rejected per pair (each <= max_length),
    # times epochs, by hand, and equal to the data analysis estimate.
    by_hand = 0
    for line in lines:
        for key in ("preferred_output", "non_preferred_output"):
            seq = {"messages": line["input"]["messages"] + line[key]}
            by_hand += min(tokenize_chat(tokenizer, seq).n_tokens, max_length)
    assert result.trained_tokens == 3 * by_hand
    report = validate_file(train_file, method="dpo")
    analyze(report, train_file, tokenizer=tokenizer, context_length=max_length, n_epochs=3, method="dpo")
    assert report.estimate["billable_tokens"] == result.trained_tokens


def test_should_stop_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", make_pairs())
    hp = Hyperparameters(n_epochs=3, batch_size=2, learning_rate_multiplier=1)
    hooks = Recorder(stop_after=2)
    with pytest.raises(TrainingStopped):
        train(spec_for(tmp_path, tiny_model_dir, train_file, hp), hooks)
    assert len(hooks.metrics) == 2 and hooks.checkpoints == []
