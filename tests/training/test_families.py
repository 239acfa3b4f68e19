"""Every model family the fast decoder covers trains with the supervised recipe and merges into a
model of its own architecture (what `tunehouse export --format merged` writes): a few real LoRA
steps on each tiny random family model (tests/tiny_families.py), in process, seconds each. The API
path (add, fine-tune through a job, serve, export, GGUF) is tests/api/test_base_models.py, on Qwen3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.tiny_families import FAMILIES
from tests.training.helpers import COLORS, Recorder, write_jsonl
from tunehouse.training.hparams import Hyperparameters
from tunehouse.training.loop import TrainSpec
from tunehouse.training.recipes.supervised import train


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_a_lora_adapter_and_merges(family, tiny_family_dirs, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunehouse.export import _write_merged

    base_dir = tiny_family_dirs[family]
    lines = [
        {"messages": [{"role": "user", "content": f"Color {i}?"}, {"role": "assistant", "content": c}]}
        for i, c in enumerate(COLORS)
    ]
    spec = TrainSpec(
        base_model_path=base_dir,
        train_file=write_jsonl(tmp_path / "train.jsonl", lines),
        valid_file=None,
        output_dir=tmp_path / "out",
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=10.0),
        seed=0,
    )
    hooks = Recorder()
    result = train(spec, hooks)
    assert result.steps == 3 and all(math.isfinite(x) for x in hooks.losses()), hooks.losses()

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    _write_merged(result.final_adapter_path, base_dir, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.model_type == family
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, result.final_adapter_path).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want, got = tuned(ids).logits, merged(ids).logits
    # The merged weights answer as base + adapter do, and training moved them away from the base.
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()
    with tuned.disable_adapter(), torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, want, atol=1e-4)
