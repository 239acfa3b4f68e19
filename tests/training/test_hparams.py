from __future__ import annotations

import math

import pytest

from tunehouse.training.hparams import (
    BASE_LEARNING_RATE,
    Hyperparameters,
    auto_batch_size,
    auto_learning_rate_multiplier,
    auto_n_epochs,
    resolve_hyperparameters,
)


@pytest.mark.parametrize(
    ("n", "epochs"),
    [
        (1, 25),  # 100 // 1 = 100, capped at 25
        (4, 25),  # 100 // 4 = 25
        (5, 20),
        (10, 10),
        (33, 3),  # 33 * 3 = 99 < 100 -> 100 // 33 = 3
        (34, 3),  # 102 >= 100: the target
        (100, 3),
        (8333, 3),  # 24,999 <= 25,000
        (8334, 2),  # 25,002 > 25,000 -> 25,000 // 8,334 = 2
        (12_500, 2),
        (25_000, 1),
        (100_000, 1),  # 25,000 // 100,000 = 0 -> at least 1
    ],
)
def test_auto_epochs_follows_the_openai_cookbook(n: int, epochs: int) -> None:
    assert auto_n_epochs(n) == epochs
    assert resolve_hyperparameters({}, n).n_epochs == epochs


@pytest.mark.parametrize(
    ("n", "batch"),
    [
        (1, 1),
        (12, 1),
        (39, 1),
        (40, 2),  # at least ~20 steps per epoch
        (79, 2),
        (80, 4),
        (90, 4),  # the shipped example set
        (120, 4),  # bench/auto_vs_plain.py's task: 30 steps per epoch, as the plain loop
        (159, 4),
        (160, 8),
        (320, 16),
        (640, 32),
        (10**6, 32),
    ],
)
def test_auto_batch_size(n: int, batch: int) -> None:
    assert auto_batch_size(n) == batch


def test_auto_learning_rate_multiplier_scales_with_sqrt_batch_never_below_one() -> None:
    assert auto_learning_rate_multiplier(8) == 1.0
    assert auto_learning_rate_multiplier(1) == 1.0  # small batches keep the base rate
    assert auto_learning_rate_multiplier(2) == 1.0
    assert auto_learning_rate_multiplier(4) == 1.0
    assert auto_learning_rate_multiplier(16) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert auto_learning_rate_multiplier(32) == 2.0
    assert auto_learning_rate_multiplier(512) == 2.0  # clipped


def test_auto_for_a_small_set_is_the_plain_lora_recipe() -> None:
    # ~120 examples: 3 epochs of batch 4 at 2e-4, what bench/auto_vs_plain.py compares against.
    hp = resolve_hyperparameters({}, 120)
    assert hp == Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=1.0)
    assert hp.learning_rate == pytest.approx(2e-4)


def test_auto_everything() -> None:
    hp = resolve_hyperparameters(
        {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, 1000
    )
    assert hp == Hyperparameters(
        n_epochs=3, batch_size=32, learning_rate_multiplier=auto_learning_rate_multiplier(32)
    )
    assert resolve_hyperparameters(None, 1000) == hp
    assert resolve_hyperparameters({"n_epochs": None}, 1000) == hp


def test_explicit_numbers_pass_through() -> None:
    hp = resolve_hyperparameters({"n_epochs": 7, "batch_size": 3, "learning_rate_multiplier": 0.1}, 10)
    assert hp == Hyperparameters(n_epochs=7, batch_size=3, learning_rate_multiplier=0.1)
    assert hp.learning_rate == pytest.approx(0.1 * BASE_LEARNING_RATE)
    # Integral floats and numeric strings are numbers too; batch larger than the set is allowed.
    hp = resolve_hyperparameters({"n_epochs": 2.0, "batch_size": "64", "learning_rate_multiplier": "2"}, 10)
    assert hp == Hyperparameters(n_epochs=2, batch_size=64, learning_rate_multiplier=2.0)
    assert isinstance(hp.n_epochs, int) and isinstance(hp.batch_size, int)


def test_auto_multiplier_follows_an_explicit_batch_size() -> None:
    assert resolve_hyperparameters({"batch_size": 32}, 10).learning_rate_multiplier == 2.0


@pytest.mark.parametrize(
    "requested",
    [
        {"n_epochs": 0},
        {"n_epochs": -1},
        {"n_epochs": 1.5},
        {"n_epochs": True},
        {"batch_size": 0},
        {"batch_size": "many"},
        {"learning_rate_multiplier": 0},
        {"learning_rate_multiplier": -0.5},
        {"learning_rate_multiplier": float("nan")},
    ],
)
def test_non_positive_or_unusable_values_raise(requested: dict) -> None:
    with pytest.raises(ValueError):
        resolve_hyperparameters(requested, 10)


def test_empty_training_set_raises() -> None:
    with pytest.raises(ValueError):
        resolve_hyperparameters({}, 0)
