"""Pinned loss curves: the tiny model, fixed data, seed and hyperparameters, fp32, must give these
exact per-step losses (to float noise) through the shared training loop, as torchtune pins its
recipes' expected losses. A change to the loop, the data pipeline, the schedule or a recipe's loss
that moves a single step shows here; if the change is meant, re-pin and say why in the commit.

The values were taken before the loop was shared by the recipes (supervised.py and dpo.py each had
their own copy), so they also prove that the refactor changed no step of either method."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import Recorder, write_jsonl
from tests.training.test_dpo import make_pairs
from tests.training.test_supervised import make_examples
from tunehouse.training import loop
from tunehouse.training.hparams import DpoHyperparameters, Hyperparameters
from tunehouse.training.recipes import dpo, supervised

SUPERVISED_LOSSES = [
    10.892214891387194,
    10.75961601443407,
    10.63202953338623,
    10.586100508527059,
    10.536400027391387,
    10.526174545288086,
]
SUPERVISED_VALID = [
    10.75754451751709,
    10.648441314697266,
    10.57839584350586,
    10.534062385559082,
    10.509618759155273,
    10.498427391052246,
]
DPO_LOSSES = [
    0.6931471824645996,
    0.3331032395362854,
    0.19654206931591034,
    0.14404812455177307,
    0.10814368724822998,
    0.07862158119678497,
]
DPO_MARGINS = [
    0.0,
    0.9281411170959473,
    1.5270671844482422,
    1.8651924133300781,
    2.1698741912841797,
    2.5035409927368164,
]


def run(recipe, spec_type, tmp_path: Path, model_dir: Path, train_lines: list[dict], hp, **kw) -> Recorder:
    train_file = write_jsonl(tmp_path / "train.jsonl", train_lines)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", train_lines[:4])
    hooks = Recorder()
    spec = spec_type(
        base_model_path=model_dir,
        train_file=train_file,
        valid_file=valid_file,
        output_dir=tmp_path / "out",
        hyperparameters=hp,
        seed=3,
        dtype="fp32",
        **kw,
    )
    recipe.train(spec, hooks)
    return hooks


def test_supervised_loss_curve_is_pinned(tmp_path: Path, tiny_model_dir: Path) -> None:
    hooks = run(
        supervised,
        loop.TrainSpec,
        tmp_path,
        tiny_model_dir,
        make_examples(),
        Hyperparameters(n_epochs=2, batch_size=5, learning_rate_multiplier=10),
    )
    valid = [m["valid_loss"] for _, m in hooks.metrics if "valid_loss" in m]
    assert hooks.losses() == pytest.approx(SUPERVISED_LOSSES, rel=1e-5)
    assert valid == pytest.approx(SUPERVISED_VALID, rel=1e-5)


def test_dpo_loss_curve_is_pinned(tmp_path: Path, tiny_model_dir: Path) -> None:
    hooks = run(
        dpo,
        dpo.DpoSpec,
        tmp_path,
        tiny_model_dir,
        make_pairs(),
        DpoHyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=20, beta=0.5),
        beta=0.5,
    )
    margins = [m["train_reward_margin"] for _, m in hooks.metrics]
    assert hooks.losses() == pytest.approx(DPO_LOSSES, rel=1e-5)
    assert margins == pytest.approx(DPO_MARGINS, rel=1e-5, abs=1e-7)
