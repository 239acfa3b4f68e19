"""OpenAI's fine-tuning hyperparameters (`n_epochs`, `batch_size`, `learning_rate_multiplier`) and
the rules that turn "auto" into numbers.

A job asks for each value as a number or "auto" (a missing key is "auto"). Checking the request
for types is the API's job; this module only refuses values that cannot train (non-positive, or a
fractional epoch/batch count) with ValueError, and resolves "auto" from the training set size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# OpenAI's `auto` epochs rule depends on the data set's size alone: the data check owns it.
from tunehouse.data.epochs import auto_n_epochs

# The learning rate that `learning_rate_multiplier` multiplies. 2e-4 is the standard LoRA rate
# (QLoRA, PEFT and TRL examples) for rank 16 / alpha 32 adapters at an effective batch of ~8-16;
# full fine-tuning uses ~10x less, but LoRA's low-rank update needs a larger step to move.
BASE_LEARNING_RATE = 2e-4
# Full fine-tuning's base rate: 2e-5, TRL's SFTTrainer default and the usual rate for fine-tuning
# every weight of a small instruct model (Zephyr, SmolLM2's own SFT used 1e-5..3e-5). Every weight
# moves, so the same step that LoRA needs would wreck what the base model knows.
BASE_LEARNING_RATE_FULL = 2e-5
# The batch size at which BASE_LEARNING_RATE is the right rate (see `auto_learning_rate_multiplier`).
REFERENCE_BATCH_SIZE = 8

# Auto batch size: about twenty steps per epoch at least, a power of two, between 1 and 32.
STEPS_PER_EPOCH_TARGET = 20
MAX_AUTO_BATCH_SIZE = 32
# Auto learning-rate multiplier: sqrt(batch / REFERENCE_BATCH_SIZE), within these bounds.
MIN_AUTO_LR_MULTIPLIER = 1.0
MAX_AUTO_LR_MULTIPLIER = 2.0


# tunehouse extensions of the method's hyperparameters: which weights train.
FINE_TUNING_TYPES = ("lora", "full")
# LoRA goes on every linear projection of attention and MLP (QLoRA showed all-linear matches full
# fine-tuning far better than q/v only). Names are Llama/Mistral/Qwen/SmolLM style.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_learning_rate(fine_tuning_type: str = "lora") -> float:
    """The rate `learning_rate_multiplier` multiplies: 2e-4 for LoRA, 2e-5 for full fine-tuning."""
    if fine_tuning_type not in FINE_TUNING_TYPES:
        raise ValueError(
            f"fine_tuning_type must be one of {', '.join(FINE_TUNING_TYPES)}, got {fine_tuning_type!r}"
        )
    return BASE_LEARNING_RATE_FULL if fine_tuning_type == "full" else BASE_LEARNING_RATE


@dataclass
class Hyperparameters:
    """Resolved values (no "auto" left), as reported back on the job."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_batch_size(n_examples: int) -> int:
    """The largest power of two <= n_examples / 20, between 1 and 32 (120 examples: 4).

    Why: on small sets (the usual case: tens to a few thousand examples) what a LoRA fine-tune
    learns in its few epochs is bounded by the number of optimizer steps times the rate, not by
    gradient noise. With ten steps per epoch (the rule before: batch 8 for 80-159 examples) the
    120-example ticket task of bench/auto_vs_plain.py took 45 steps and fell behind a plain loop
    at batch 4 (90 steps, same 2e-4); at least twenty steps per epoch gives that loop's step count.
    The compute per epoch is the same (the same tokens); only the per-step overhead grows.
    Beyond a few hundred examples a batch of 32 already averages out per-example noise for a LoRA
    adapter; bigger batches only cost memory.
    (OpenAI's own rule is unpublished; observed values are ~0.2% of the set, capped at 256.)
    """
    target = n_examples // STEPS_PER_EPOCH_TARGET
    if target < 1:
        return 1
    return min(MAX_AUTO_BATCH_SIZE, 1 << (target.bit_length() - 1))


def auto_learning_rate_multiplier(batch_size: int) -> float:
    """sqrt(batch_size / 8), clipped to [1, 2]: Adam's square-root scaling rule, never below the
    base rate (batch <= 8: 1, i.e. 2e-4 for LoRA; 16: 1.41; >= 32: 2).

    Why: with Adam the update size per step is ~lr, and the gradient noise falls with sqrt(batch);
    the square-root rule (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms") keeps training dynamics alike across batch sizes for larger batches. Below batch 8
    it is not applied: small batches come from small sets (auto_batch_size), whose few epochs are
    short of steps x rate, not of noise, so shrinking the rate there only undertrains (batch 4 at
    0.71 x 2e-4 is below what a plain LoRA loop uses at batch 4). The upper clip stops large
    batches from overshooting (2 -> 4e-4) on small data.
    """
    ratio = math.sqrt(batch_size / REFERENCE_BATCH_SIZE)
    return round(min(MAX_AUTO_LR_MULTIPLIER, max(MIN_AUTO_LR_MULTIPLIER, ratio)), 4)


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}") from None
    if not number.is_integer() or number <= 0:
        raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")
    return int(number)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be 'auto' or a positive number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be 'auto' or a positive number, got {value!r}")
    return number


def resolve_hyperparameters(requested: dict[str, Any] | None, n_examples: int) -> Hyperparameters:
    """Turn a job's requested hyperparameters into numbers.

    `requested` holds n_epochs / batch_size / learning_rate_multiplier, each "auto", a number or
    missing. The batch size is resolved before the learning-rate multiplier, which depends on it.
    """
    if n_examples <= 0:
        raise ValueError(f"n_examples must be positive, got {n_examples}")
    requested = requested or {}

    n_epochs = requested.get("n_epochs")
    n_epochs = auto_n_epochs(n_examples) if _is_auto(n_epochs) else _positive_int("n_epochs", n_epochs)

    batch_size = requested.get("batch_size")
    batch_size = (
        auto_batch_size(n_examples) if _is_auto(batch_size) else _positive_int("batch_size", batch_size)
    )

    lrm = requested.get("learning_rate_multiplier")
    lrm = (
        auto_learning_rate_multiplier(batch_size)
        if _is_auto(lrm)
        else _positive_float("learning_rate_multiplier", lrm)
    )
    return Hyperparameters(n_epochs=n_epochs, batch_size=batch_size, learning_rate_multiplier=lrm)


# ----------------------------------------------------------------------------------------------
# DPO (`method.dpo.hyperparameters`): the three above plus `beta`
# ----------------------------------------------------------------------------------------------

# DPO's beta scales the implicit reward beta * log(pi / pi_ref); OpenAI accepts (0, 2] and says a
# higher beta keeps the model closer to the reference (REFERENCE §5.3).
DEFAULT_BETA = 0.1
MAX_BETA = 2.0


def auto_beta() -> float:
    """0.1: the value of the DPO paper (Rafailov et al. 2023) and TRL's DPOTrainer default.

    Why not scale it with the data: beta sets how far the policy may drift from the reference per
    unit of preference signal, a property of the task, not of the set size; 0.1 is the
    well-tested middle (0.01-0.5 is the range people tune in). It is only a default: ask for a
    larger beta to stay closer to the base model, a smaller one to follow the preferences harder.
    """
    return DEFAULT_BETA


@dataclass
class DpoHyperparameters(Hyperparameters):
    """Resolved DPO values: n_epochs, batch_size (preference pairs per step),
    learning_rate_multiplier, and beta in (0, 2]."""

    beta: float


def resolve_dpo_hyperparameters(requested: dict[str, Any] | None, n_examples: int) -> DpoHyperparameters:
    """`resolve_hyperparameters` for a DPO job: the same auto rules for n_epochs / batch_size /
    learning_rate_multiplier (n_examples counts preference pairs), and `beta` ("auto" or missing:
    `auto_beta()`; otherwise a number in (0, 2], else ValueError)."""
    requested = requested or {}
    hp = resolve_hyperparameters({k: v for k, v in requested.items() if k != "beta"}, n_examples)
    raw = requested.get("beta")
    if _is_auto(raw):
        beta = auto_beta()
    else:
        bad = ValueError(f"beta must be 'auto' or a number in (0, {MAX_BETA:g}], got {raw!r}")
        try:
            beta = _positive_float("beta", raw)
        except ValueError:
            raise bad from None
        if beta > MAX_BETA:
            raise bad
    return DpoHyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        beta=beta,
    )


# ----------------------------------------------------------------------------------------------
# Reinforcement (`method.reinforcement.hyperparameters`): OpenAI's names, mapped onto GRPO
# ----------------------------------------------------------------------------------------------

GROUP_SIZE = 8  # answers sampled per prompt at compute_multiplier 1 (TRL's num_generations)
# reasoning_effort -> the most tokens an answer may have (the model here has no separate
# reasoning phase: effort is how long it may answer).
ANSWER_TOKENS = {"low": 128, "default": 256, "medium": 256, "high": 512}
AUTO_EVAL_INTERVAL = 5
AUTO_EVAL_SAMPLES = 8
# GRPO moves a LoRA adapter in smaller steps than supervised learning does: 0.25 x 2e-4 = 5e-5.
AUTO_RFT_LEARNING_RATE_MULTIPLIER = 0.25


@dataclass
class ReinforcementHyperparameters(Hyperparameters):
    """Resolved RFT values: n_epochs, batch_size (prompts per step), learning_rate_multiplier,
    OpenAI's reasoning_effort / compute_multiplier / eval_interval / eval_samples, and what they
    became: group_size (answers per prompt) and max_completion_tokens."""

    reasoning_effort: str
    compute_multiplier: float
    eval_interval: int
    eval_samples: int
    group_size: int
    max_completion_tokens: int
    kl_beta: float


def resolve_reinforcement_hyperparameters(
    requested: dict[str, Any] | None, n_examples: int
) -> ReinforcementHyperparameters:
    """n_epochs and batch_size as for supervised jobs (n_examples counts prompts); the learning
    rate multiplier `auto` is AUTO_RFT_LEARNING_RATE_MULTIPLIER; compute_multiplier scales the
    group of answers per prompt (GROUP_SIZE x it, at least 2: GRPO compares answers within a
    group); reasoning_effort picks the answer length (ANSWER_TOKENS), unless the tunehouse extension
    max_completion_tokens sets it."""
    requested = requested or {}
    own = (
        "reasoning_effort",
        "compute_multiplier",
        "eval_interval",
        "eval_samples",
        "kl_beta",
        "max_completion_tokens",
    )
    hp = resolve_hyperparameters(
        {k: v for k, v in requested.items() if k not in own and k != "learning_rate_multiplier"}, n_examples
    )
    lrm = requested.get("learning_rate_multiplier")
    lrm = (
        AUTO_RFT_LEARNING_RATE_MULTIPLIER
        if _is_auto(lrm)
        else _positive_float("learning_rate_multiplier", lrm)
    )
    effort = requested.get("reasoning_effort") or "default"
    if effort not in ANSWER_TOKENS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(ANSWER_TOKENS)}, got {effort!r}")
    compute = requested.get("compute_multiplier")
    compute = 1.0 if _is_auto(compute) else _positive_float("compute_multiplier", compute)
    interval = requested.get("eval_interval")
    interval = AUTO_EVAL_INTERVAL if _is_auto(interval) else _positive_int("eval_interval", interval)
    samples = requested.get("eval_samples")
    samples = AUTO_EVAL_SAMPLES if _is_auto(samples) else _positive_int("eval_samples", samples)
    return ReinforcementHyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=lrm,
        reasoning_effort=effort,
        compute_multiplier=compute,
        eval_interval=interval,
        eval_samples=samples,
        group_size=max(2, min(64, round(GROUP_SIZE * compute))),
        max_completion_tokens=_positive_int("max_completion_tokens", requested["max_completion_tokens"])
        if requested.get("max_completion_tokens") is not None
        else ANSWER_TOKENS[effort],
        kl_beta=float(requested.get("kl_beta") or 0.0),
    )
