"""The training context is the model's own (its config's max_position_embeddings), not a fixed cap."""

from __future__ import annotations

import pytest

from tunehouse.training.hparams import Hyperparameters
from tunehouse.training.loop import TrainSpec

pytestmark = pytest.mark.one_database


def _spec(model_dir, tmp_path, **kw) -> TrainSpec:
    return TrainSpec(
        base_model_path=model_dir,
        train_file=tmp_path / "train.jsonl",
        valid_file=None,
        output_dir=tmp_path / "out",
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=1, learning_rate_multiplier=1.0),
        seed=0,
        **kw,
    )


def test_max_length_defaults_to_the_models_context(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "max_position_embeddings": 32768}')
    assert _spec(tmp_path, tmp_path).max_length == 32768
    assert _spec(tmp_path, tmp_path, max_length=40).max_length == 40  # asked for: kept
