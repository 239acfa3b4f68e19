"""Direct Preference Optimization (DPO) on OpenAI preference JSONL: a LoRA adapter, or every weight.

The shared loop (training/loop.py) does the rest (resolve, load, optimizer, state, stops, data
parallelism, checkpoints); this recipe brings:

    data       each line -> two sequences: prompt + preferred, prompt + non-preferred; only the
               final assistant message is trained (earlier assistant turns get weight 0)
    reference  log-probs of both sequences under the model training starts from, computed ONCE
               before training (no second copy of the model in memory), and they never change
    loss       DPO (Rafailov et al. 2023), the mean over the step's pairs of
                   loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
               where pi_x / ref_x are sequence log-probs summed over the trained tokens

The reference is the model as it is before the first step, as OpenAI's DPO on a fine-tuned model
uses that model as its reference:
    from a base model, fresh LoRA   the base: the same model with its adapter disabled
    from an ft: LoRA model          that model: its adapter (init_adapter_path) is trained further,
                                    and the reference log-probs are taken with it, before step 1
    full fine-tuning                the starting weights (the base, an ft: full model's folder, or
                                    the base with an ft: adapter merged in), before step 1
Continuing the ft: adapter itself (rather than merging it and training a fresh adapter on top)
keeps the result an ordinary adapter on the base: served, exported and continued like any other.

With a state_dir the loop's training state carries the reference log-probs too (a resumed run must not take them again from the half-trained policy); a stopped,
paused or killed run continues step for step as if never interrupted.

Metrics (per step, via hooks.on_metrics):
    train_loss                  the mean DPO loss over the step's pairs
    train_mean_token_accuracy   the *preference* accuracy: the fraction of pairs whose chosen reward
                                beta * (pi_c - ref_c) is strictly greater than the rejected one (0 at
                                the first step, where policy == reference). There is no meaningful
                                token accuracy in DPO; this fills the same slot of the results file.
    train_rewards_chosen        mean beta * (pi_c - ref_c)
    train_rewards_rejected      mean beta * (pi_r - ref_r)
    train_reward_margin         mean chosen - rejected reward
    valid_loss / valid_mean_token_accuracy (small rotating batch), full_valid_* (each epoch end):
                                the same two quantities on the validation pairs.

Billing (trained_tokens): per pair, the tokens of (prompt + preferred) plus the tokens of
(prompt + non-preferred), each truncated to max_length, times n_epochs. That is what
tunehouse.data.analysis estimates for a DPO file (`_sequences` + `len(input_ids)` per sequence), so
the estimate and the job's trained_tokens agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tunehouse.training.examples import IGNORE, Example, build_example, padded, read_jsonl, split_by_length
from tunehouse.training.hparams import MAX_BETA, DpoHyperparameters, auto_beta
from tunehouse.training.loop import Data, Model, TrainHooks, TrainingStopped, TrainResult, TrainSpec, run

logger = logging.getLogger(__name__)


@dataclass
class DpoSpec(TrainSpec):
    """TrainSpec plus beta. `hyperparameters` may be a plain Hyperparameters or a
    DpoHyperparameters (from resolve_dpo_hyperparameters); `beta=None` takes the latter's beta,
    else auto_beta() (0.1). After construction `beta` is always a float in (0, 2]."""

    beta: float | None = None

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # TrainSpec may grow one
            parent()
        hp_beta = getattr(self.hyperparameters, "beta", None)
        if self.beta is None:
            self.beta = hp_beta if hp_beta is not None else auto_beta()
        elif hp_beta is not None and float(hp_beta) != float(self.beta):
            raise ValueError(f"beta {self.beta} disagrees with hyperparameters.beta {hp_beta}")
        self.beta = float(self.beta)
        if not 0 < self.beta <= MAX_BETA:
            raise ValueError(f"beta must be in (0, {MAX_BETA:g}], got {self.beta}")


# ----------------------------------------------------------------------------------------------
# data: one preference line -> two training sequences
# ----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One preference line. `ref_*` are the reference model's sequence log-probs (filled in once,
    before training)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def billable_tokens(self) -> int:
        return self.chosen.billable_tokens + self.rejected.billable_tokens

    @property
    def trainable(self) -> bool:
        return bool(self.chosen.n_trained and self.rejected.n_trained)

    @property
    def width(self) -> int:
        return max(len(self.chosen.inputs), len(self.rejected.inputs))


def build_pair(tokenizer, line: dict, max_length: int) -> Pair:
    """{"input": {"messages", "tools"?, ...}, "preferred_output": [msg], "non_preferred_output": [msg]}
    -> two Examples. Assistant turns inside `input` are context (weight 0); the output message is
    always trained, whatever weight it carries."""
    inp = line["input"]
    extra = {k: v for k, v in inp.items() if k != "messages"}  # tools, parallel_tool_calls
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in inp["messages"]]

    def sequence(key: str) -> Example:
        answer = {k: v for k, v in line[key][0].items() if k != "weight"}
        return build_example(tokenizer, {**extra, "messages": [*context, answer]}, max_length)

    return Pair(chosen=sequence("preferred_output"), rejected=sequence("non_preferred_output"))


def read_pairs(tokenizer, path: Path, max_length: int) -> list[Pair]:
    return [build_pair(tokenizer, line, max_length) for line in read_jsonl(path, method="dpo")]


def pair_batches(pairs: list[Pair], pad_id: int) -> Iterator[tuple[object, object, list[Pair], int]]:
    """Micro-batches of whole pairs: rows [0, k) are the chosen sequences of the k pairs, rows
    [k, 2k) their rejected ones, right-padded (no attention mask needed, as in supervised's
    micro_batches). Pairs are sorted by width and cut with split_by_length, each pair counting as
    two rows. Yields (inputs [2k, L], labels [2k, L], the k pairs, n_real_tokens)."""
    todo = sorted(pairs, key=lambda p: p.width, reverse=True)
    start = 0
    for end in split_by_length([2 * p.width for p in todo]):
        chunk, start = todo[start:end], end
        rows = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        inputs, labels = padded(rows, pad_id)
        yield inputs, labels, chunk, sum(len(ex.inputs) for ex in rows)


# ----------------------------------------------------------------------------------------------
# log-probs and the loss
# ----------------------------------------------------------------------------------------------


def sequence_logps(decoder, lm_head, inputs, labels, softcap: float | None = None):
    """Per row, the sum of log p(label) over its trained positions: a [B] fp32 tensor.

    As in supervised's trained_token_loss, only the trained positions go through the lm_head."""
    hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, L, d]
    trained = labels != IGNORE  # [B, L]
    rows = trained.nonzero(as_tuple=True)[0]  # [N] row of each trained position
    logits = lm_head(hidden[trained]).float()  # [N, V]
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    token_logps = -F.cross_entropy(logits, labels[trained], reduction="none")  # [N]
    out = torch.zeros(inputs.shape[0], dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss and the implicit rewards beta * (pi - ref) of each side."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def reference_logps(
    model,
    decoder,
    lm_head,
    pairs: list[Pair],
    pad_id: int,
    *,
    device,
    autocast,
    softcap=None,
    should_stop=None,
    disable_adapter: bool = True,
) -> None:
    """Fills pair.ref_chosen / ref_rejected, under no_grad and in eval mode: the base model's
    log-probs, i.e. the PEFT model with its adapter disabled; with `disable_adapter=False` (or a
    plain model) the model's own, as it is now."""
    was_training = model.training
    model.eval()
    off = model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), off:
            for inputs, labels, chunk, _ in pair_batches(pairs, pad_id):
                if should_stop is not None and should_stop():
                    raise TrainingStopped("stopped while computing the reference log-probs")
                with autocast:
                    logps = sequence_logps(decoder, lm_head, inputs.to(device), labels.to(device), softcap)
                k = len(chunk)
                for i, pair in enumerate(chunk):
                    pair.ref_chosen, pair.ref_rejected = logps[i].item(), logps[k + i].item()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------


class Dpo:
    """The loop's recipe for DPO (see the module docstring)."""

    state_info = {"method": "dpo"}
    checkpoint_info = {"method": "dpo"}
    n_sums = 4  # loss, chosen > rejected, chosen reward, rejected reward

    def __init__(self, spec: DpoSpec):
        self.spec = spec
        self.beta = spec.beta
        self.pairs: list[Pair] = []  # training then validation pairs, in the reference's order

    def load_data(self, spec: TrainSpec, tokenizer) -> Data:
        all_train = read_pairs(tokenizer, spec.train_file, spec.max_length)
        if not all_train:
            raise ValueError("the training file has no preference pairs")
        # Billing counts every line read, as supervised does; a pair that truncation left without a
        # trained token on either side (analysis reports it as an error) cannot train and is skipped.
        trained_tokens = sum(p.billable_tokens for p in all_train) * spec.hyperparameters.n_epochs
        train = [p for p in all_train if p.trainable]
        if len(train) < len(all_train):
            logger.warning(
                "%d pairs have no trained token left after truncation", len(all_train) - len(train)
            )
        if not train:
            raise ValueError("no preference pair has a trained token left after truncation")
        valid = read_pairs(tokenizer, spec.valid_file, spec.max_length) if spec.valid_file else []
        valid = [p for p in valid if p.trainable]
        self.pairs = train + valid
        logger.info("DPO with beta %g", self.beta)
        return Data(
            train=train,
            valid=valid,
            trained_tokens=trained_tokens,
            run_key={
                "method": "dpo",
                "n_train_pairs": len(train),
                "n_valid_pairs": len(valid),
                "fine_tuning_type": spec.fine_tuning_type,
            },
        )

    def prepare(self, m: Model, data: Data, *, saved: dict | None, should_stop) -> None:
        if saved is not None:
            # The reference of the model training started from, not of the half-trained policy.
            for p, (c, r) in zip(self.pairs, saved["reference"].tolist(), strict=True):
                p.ref_chosen, p.ref_rejected = c, r
            return
        started = time.perf_counter()
        reference_logps(
            m.model, m.decoder, m.lm_head, self.pairs, m.pad_id,
            device=m.device, autocast=m.autocast, softcap=m.softcap, should_stop=should_stop,
            # A fresh adapter starts as a no-op: "disabled" is the same model, and cheaper. A
            # continued adapter or full weights: the model as it starts is the reference.
            disable_adapter=self.spec.fine_tuning_type == "lora" and self.spec.init_adapter_path is None,
        )  # fmt: skip
        logger.info("reference log-probs in %.1f s", time.perf_counter() - started)

    def state_extra(self) -> dict:
        reference = [[p.ref_chosen, p.ref_rejected] for p in self.pairs]
        return {"reference": torch.tensor(reference, dtype=torch.float64)}  # [n_train + n_valid, 2]

    def normaliser(self, items: Sequence[Pair]) -> float:
        return len(items)

    def micro_steps(
        self, m: Model, items: Sequence[Pair], *, normaliser: float | None
    ) -> Iterator[tuple[list[float], int]]:
        for inputs, labels, chunk, n_real in pair_batches(list(items), m.pad_id):
            k = len(chunk)
            ref_c = torch.tensor([p.ref_chosen for p in chunk], device=m.device)
            ref_r = torch.tensor([p.ref_rejected for p in chunk], device=m.device)
            with m.autocast:
                logps = sequence_logps(
                    m.decoder, m.lm_head, inputs.to(m.device), labels.to(m.device), m.softcap
                )
            losses, chosen, rejected = dpo_loss(logps[:k], logps[k:], ref_c, ref_r, self.beta)
            if normaliser is not None:
                (losses.sum() * (1.0 / normaliser)).backward()
            chosen, rejected = chosen.detach(), rejected.detach()
            sums = [
                losses.detach().sum().item(),
                (chosen > rejected).sum().item(),
                chosen.sum().item(),
                rejected.sum().item(),
            ]
            yield sums, n_real

    def metrics(self, sums: list[float], n: float) -> dict[str, float]:
        loss, correct, chosen, rejected = sums
        return {
            "train_loss": loss / n,
            # The *preference* accuracy (see the module docstring); it fills the token accuracy's slot.
            "train_mean_token_accuracy": correct / n,
            "train_rewards_chosen": chosen / n,
            "train_rewards_rejected": rejected / n,
            "train_reward_margin": (chosen - rejected) / n,
        }


def train(spec: DpoSpec, hooks: TrainHooks) -> TrainResult:
    hp = spec.hyperparameters
    # Checkpoints and the saved state record beta among the hyperparameters.
    hp = DpoHyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        beta=spec.beta,
    )
    spec = replace(spec, hyperparameters=hp)
    return run(spec, Dpo(spec), hooks)
