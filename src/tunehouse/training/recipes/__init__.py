"""The training methods, looked up by name (`method.type` of a fine-tuning job).

The job runner, the API and the data check ask this table instead of testing a method's name. A
new method is a recipe module (its data, its loss, its metrics over the shared loop in
training/loop.py) plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunehouse.training import hparams
from tunehouse.training.loop import TrainHooks, TrainResult, TrainSpec
from tunehouse.training.recipes import dpo, reinforcement, supervised


@dataclass(frozen=True)
class Method:
    name: str  # as in the job's `method.type`
    # Resolves the job's requested hyperparameters ("auto" or values) for a training set of n
    # examples; ValueError names a value that cannot train.
    resolve_hyperparameters: Callable[[dict[str, Any] | None, int], hparams.Hyperparameters]
    # The recipe's TrainSpec from the fields every method shares and the resolved hyperparameters.
    make_spec: Callable[[dict[str, Any], dict[str, Any]], TrainSpec]
    train: Callable[[TrainSpec, TrainHooks], TrainResult]


def _supervised_spec(common: dict[str, Any], resolved: dict[str, Any]) -> TrainSpec:
    return TrainSpec(**common)


def _dpo_spec(common: dict[str, Any], resolved: dict[str, Any]) -> TrainSpec:
    return dpo.DpoSpec(**common, beta=float(resolved["beta"]))


def _reinforcement_spec(common: dict[str, Any], resolved: dict[str, Any]) -> TrainSpec:
    # The sampler and the rewarder are the job's to give (jobs/fine_tuning.py): training knows
    # neither the inference engine nor the graders.
    return reinforcement.ReinforcementSpec(
        **common,
        group_size=int(resolved["group_size"]),
        max_completion_tokens=int(resolved["max_completion_tokens"]),
        kl_beta=float(resolved.get("kl_beta", 0.0)),
        eval_interval=int(resolved["eval_interval"]),
        eval_samples=int(resolved["eval_samples"]),
    )


METHODS: dict[str, Method] = {
    "supervised": Method("supervised", hparams.resolve_hyperparameters, _supervised_spec, supervised.train),
    "dpo": Method("dpo", hparams.resolve_dpo_hyperparameters, _dpo_spec, dpo.train),
    "reinforcement": Method(
        "reinforcement",
        hparams.resolve_reinforcement_hyperparameters,
        _reinforcement_spec,
        reinforcement.train,
    ),
}


def method(name: str) -> Method:
    """The method called `name`; ValueError for one this server does not train."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"the method {name!r} is not available on this server; use {' or '.join(map(repr, METHODS))}"
        ) from None
