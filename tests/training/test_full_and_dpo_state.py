"""Full fine-tuning (every weight, checkpoints as whole model folders), DPO's resumable state, and
DPO from a fine-tuned model, for real on the tiny 2-layer model (CPU, about a second per run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.training.helpers import write_jsonl
from tests.training.test_dpo import make_pairs
from tests.training.test_resume import Plain, Recorder, after_metrics, assert_same_metrics, write_data
from tunehouse.training import loop
from tunehouse.training.hparams import BASE_LEARNING_RATE_FULL, DpoHyperparameters, Hyperparameters
from tunehouse.training.loop import TrainingStopped, TrainSpec
from tunehouse.training.recipes import dpo, supervised

HP = Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=10)  # 6 steps (12 lines)
DPO_HP = DpoHyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=5, beta=0.1)  # 6 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    lines = make_pairs()  # 10 pairs
    lines += lines[:2]  # 12: 3 steps of 4 per epoch
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", lines)


def sft_spec(root: Path, model_dir: Path, data, **kw) -> TrainSpec:
    return TrainSpec(
        base_model_path=model_dir,
        train_file=data[0],
        valid_file=data[1],
        output_dir=root / "out",
        hyperparameters=kw.pop("hp", HP),
        seed=3,
        **kw,
    )


def dpo_spec(root: Path, model_dir: Path, train_file: Path, **kw) -> dpo.DpoSpec:
    return dpo.DpoSpec(
        base_model_path=model_dir,
        train_file=train_file,
        valid_file=kw.pop("valid_file", None),
        output_dir=root / "out",
        hyperparameters=kw.pop("hp", DPO_HP),
        seed=5,
        **kw,
    )


def model_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------
# full fine-tuning
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, data, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("full")
    hooks = Plain()
    result = supervised.train(sft_spec(root, tiny_model_dir, data, fine_tuning_type="full"), hooks)
    return hooks, result


def test_full_fine_tuning_trains_every_weight_into_a_plain_model_folder(
    tiny_model_dir: Path, full_run
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hooks, result = full_run
    assert hooks.steps() == [1, 2, 3, 4, 5, 6]
    assert [s for s, _, _ in hooks.checkpoints] == [3, 6]
    losses = hooks.losses()
    assert losses[-1] < losses[0]
    assert "full_valid_loss" in hooks.metrics[-1][1]
    ckpt = result.final_adapter_path
    # A normal Hugging Face model folder: config, safetensors weights, tokenizer with its template.
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert not (ckpt / "adapter_config.json").exists()
    assert (
        AutoTokenizer.from_pretrained(ckpt).chat_template
        == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    )
    meta = json.loads((ckpt / "tunehouse.json").read_text())
    assert meta["fine_tuning_type"] == "full" and "lora" not in meta
    assert meta["learning_rate"] == pytest.approx(BASE_LEARNING_RATE_FULL * 10)

    tuned = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    assert tuned_params.keys() == base_params.keys()
    changed = [n for n in base_params if not torch.equal(tuned_params[n], base_params[n])]
    # Every weight matrix moved, not only the attention/MLP projections LoRA would touch.
    assert {n for n in base_params if "norm" not in n} <= set(changed)
    assert any("norm" in n for n in changed) and any("embed" in n for n in changed)


def test_full_fine_tuning_stops_and_resumes_step_for_step(
    tmp_path: Path, tiny_model_dir: Path, data, full_run
) -> None:
    ref_hooks, ref = full_run
    state_dir = tmp_path / "state"
    spec = sft_spec(tmp_path, tiny_model_dir, data, fine_tuning_type="full", state_dir=state_dir)
    first = Recorder(stop=after_metrics(2, poll=2))  # inside step 3: discarded and redone
    with pytest.raises(TrainingStopped):
        supervised.train(spec, first)
    assert first.saved == [2]
    assert sorted(p.name for p in state_dir.iterdir()) == ["model", "state.json", "trainer.pt"]

    second = Recorder()
    result = supervised.train(spec, second)
    assert result.resumed_from_step == 2 and second.steps() == [3, 4, 5, 6]
    assert_same_metrics(first.metrics + second.metrics, ref_hooks.metrics)
    assert_same(model_weights(result.final_adapter_path), model_weights(ref.final_adapter_path))

    # A LoRA state is not a full one: the run is refused, not silently mixed.
    with pytest.raises(ValueError, match="different run"):
        supervised.train(sft_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir), Plain())


def test_full_fine_tuning_continues_a_full_or_a_lora_model(
    tmp_path: Path, tiny_model_dir: Path, data, full_run
) -> None:
    ref_hooks, ref = full_run
    one_step = Hyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=10)

    # From a fully fine-tuned model: its folder is the base to train further.
    more = Plain(stop=after_metrics(1))
    with pytest.raises(TrainingStopped):
        supervised.train(
            sft_spec(tmp_path / "a", ref.final_adapter_path, data, fine_tuning_type="full", hp=one_step), more
        )
    assert more.losses()[0] < ref_hooks.losses()[0]

    # From a LoRA model: its adapter is merged into the weights, which then all train; the first
    # loss is the LoRA model's own (up to the merge's rounding).
    lora = supervised.train(sft_spec(tmp_path / "b", tiny_model_dir, data, hp=one_step), Plain())
    lora_again = Plain(stop=after_metrics(1))
    with pytest.raises(TrainingStopped):
        supervised.train(
            sft_spec(
                tmp_path / "c", tiny_model_dir, data, hp=one_step, init_adapter_path=lora.final_adapter_path
            ),
            lora_again,
        )
    merged = Plain(stop=after_metrics(1))
    with pytest.raises(TrainingStopped):
        supervised.train(
            sft_spec(
                tmp_path / "d",
                tiny_model_dir,
                data,
                hp=one_step,
                fine_tuning_type="full",
                init_adapter_path=lora.final_adapter_path,
            ),
            merged,
        )
    assert merged.losses()[0] == pytest.approx(lora_again.losses()[0], abs=0.02)


def test_target_modules_are_checked_against_the_model(tiny_model_dir: Path) -> None:
    assert loop.check_target_modules(tiny_model_dir, ["q_proj", "down_proj"]) == []
    assert loop.check_target_modules(tiny_model_dir, ["q_proj", "query_key_value", "norm"]) == [
        "query_key_value",
        "norm",  # not a linear layer
    ]


# ----------------------------------------------------------------------------------------------
# DPO: resumable state, DPO from a fine-tuned model, full DPO
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, pairs_file: Path, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo")
    hooks = Plain()
    result = dpo.train(dpo_spec(root, tiny_model_dir, pairs_file, valid_file=pairs_file), hooks)
    return hooks, result


@pytest.mark.parametrize(
    ("stop", "saved_at"),
    [
        pytest.param(after_metrics(2), 2, id="between-steps"),
        pytest.param(after_metrics(4, poll=2), 4, id="inside-a-step"),
    ],
)
def test_dpo_stops_and_resumes_on_the_same_loss_curve(
    tmp_path: Path, tiny_model_dir: Path, pairs_file: Path, dpo_run, stop, saved_at
) -> None:
    ref_hooks, ref = dpo_run
    state_dir = tmp_path / "state"
    spec = dpo_spec(tmp_path, tiny_model_dir, pairs_file, valid_file=pairs_file, state_dir=state_dir)
    first = Recorder(stop=stop)
    with pytest.raises(TrainingStopped):
        dpo.train(spec, first)
    # Saved at the stop, and at the end of epoch 1 (step 3) when the run got that far.
    assert first.saved == [s for s in (3,) if s < saved_at] + [saved_at]
    assert first.steps() == list(range(1, saved_at + 1))
    assert sorted(p.name for p in state_dir.iterdir()) == ["adapter", "state.json", "trainer.pt"]

    second = Recorder()
    result = dpo.train(spec, second)
    assert result.resumed_from_step == saved_at and second.resumed == [saved_at]
    assert second.steps() == list(range(saved_at + 1, 7))
    # The same curve: losses, preference accuracies, rewards (so the same reference log-probs).
    assert_same_metrics(first.metrics + second.metrics, ref_hooks.metrics)
    assert_same(adapter_weights(result.final_adapter_path), adapter_weights(ref.final_adapter_path))


def test_dpo_from_a_fine_tuned_adapter_uses_that_model_as_start_and_reference(
    tmp_path: Path, tiny_model_dir: Path, pairs_file: Path, data
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An SFT job's adapter (rank 4), then DPO from it.
    sft = supervised.train(
        sft_spec(tmp_path / "sft", tiny_model_dir, data, lora_rank=4, lora_alpha=8), Plain()
    )
    hooks = Recorder()
    result = dpo.train(
        dpo_spec(tmp_path / "dpo", tiny_model_dir, pairs_file, init_adapter_path=sft.final_adapter_path),
        hooks,
    )
    # Step 1's policy is the reference (the SFT model), so its loss is exactly log 2 and no
    # reward moved yet: had the reference been the base, the SFT adapter would already shift them.
    first = hooks.metrics[0][1]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train_rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert first["train_rewards_rejected"] == pytest.approx(0, abs=1e-6)
    assert hooks.losses()[-1] < math.log(2)  # and it learns from there
    # The result is that adapter trained further (its shape), an ordinary adapter on the base.
    config = json.loads((result.final_adapter_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    meta = json.loads((result.final_adapter_path / "tunehouse.json").read_text())
    assert meta["method"] == "dpo" and meta["init_adapter_path"] == str(sft.final_adapter_path)

    # The reference log-probs are the SFT model's, not the base's.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = dpo.read_pairs(tokenizer, pairs_file, 2048)[:3]
    sft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft.final_adapter_path
    )
    inner = sft_model.get_base_model()
    dpo.reference_logps(
        sft_model, inner.get_decoder(), inner.get_output_embeddings(), pairs, 0,
        device="cpu", autocast=torch.autocast("cpu", enabled=False), disable_adapter=False,
    )  # fmt: skip
    with_sft = [(p.ref_chosen, p.ref_rejected) for p in pairs]
    dpo.reference_logps(
        sft_model, inner.get_decoder(), inner.get_output_embeddings(), pairs, 0,
        device="cpu", autocast=torch.autocast("cpu", enabled=False),
    )  # fmt: skip
    base_only = [(p.ref_chosen, p.ref_rejected) for p in pairs]
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(with_sft, base_only, strict=True))


def test_full_dpo_saves_a_model_folder(tmp_path: Path, tiny_model_dir: Path, pairs_file: Path) -> None:
    hooks = Plain()
    result = dpo.train(dpo_spec(tmp_path, tiny_model_dir, pairs_file, fine_tuning_type="full"), hooks)
    assert hooks.losses()[0] == pytest.approx(math.log(2), abs=1e-6)  # reference = starting weights
    assert hooks.losses()[-1] < math.log(2)
    assert (result.final_adapter_path / "model.safetensors").is_file()
    assert (
        json.loads((result.final_adapter_path / "tunehouse.json").read_text())["fine_tuning_type"] == "full"
    )
