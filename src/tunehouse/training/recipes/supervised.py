"""Supervised fine-tuning (SFT) on OpenAI chat-format JSONL: a LoRA adapter, or every weight.

The shared loop (training/loop.py) does the rest; this recipe brings:

    data   each chat line -> token ids + labels on the assistant tokens only, per-message
           `weight` honoured (training/examples.py); billable tokens = every token of every line
           (truncated to max_length) x n_epochs
    loss   mean cross-entropy over the step's trained tokens, computed only at those positions
    report train_loss, train_mean_token_accuracy (and the same on validation data)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch.nn.functional as F

from tunehouse.training.examples import IGNORE, Example, build_example, padded, read_jsonl, split_by_length
from tunehouse.training.loop import Data, Model, TrainHooks, TrainResult, TrainSpec, run

logger = logging.getLogger(__name__)


def micro_batches(examples: list[Example], pad_id: int) -> Iterator[tuple[object, object, int]]:
    """One optimizer step's examples as padded tensors, little padding, bounded memory.

    Examples are sorted by length and cut into runs of similar length (split_by_length), each
    right-padded (training/examples.py `padded`). Yields (inputs [B, L], labels [B, L],
    n_real_tokens)."""
    todo = sorted((ex for ex in examples if ex.n_trained), key=lambda ex: len(ex.inputs), reverse=True)
    start = 0
    for end in split_by_length([len(ex.inputs) for ex in todo]):
        chunk, start = todo[start:end], end
        inputs, labels = padded(chunk, pad_id)
        yield inputs, labels, sum(len(ex.inputs) for ex in chunk)


def trained_token_loss(decoder, lm_head, inputs, labels, softcap: float | None = None):
    """Sum of cross-entropy and count of correct argmax predictions over the trained positions.

    The decoder gives hidden states for every position, but only the trained ones go through the
    lm_head: [n_trained, vocab] logits instead of [B, L, vocab]. For SmolLM2 (vocab 49,152,
    hidden 576) the full projection alone would cost as much as ~10 decoder layers.
    """
    hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, L, d]
    trained = labels != IGNORE  # [B, L]
    logits = lm_head(hidden[trained]).float()  # [N, V], fp32 for a stable softmax
    if softcap:  # Gemma 2 style final-logit soft-capping
        logits = softcap * (logits / softcap).tanh()
    targets = labels[trained]  # [N]
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss_sum, correct


class Supervised:
    """The loop's recipe for supervised fine-tuning (see the module docstring)."""

    state_info: dict = {}
    checkpoint_info: dict = {}
    n_sums = 2  # loss, correct predictions

    def __init__(self, spec: TrainSpec):
        # What a saved state must agree on, beyond the loop's own keys (a LoRA run's key is as it
        # was before full fine-tuning existed, so its states stay resumable).
        self.run_key = {"fine_tuning_type": "full"} if spec.fine_tuning_type == "full" else {}

    def load_data(self, spec: TrainSpec, tokenizer) -> Data:
        train = [build_example(tokenizer, line, spec.max_length) for line in read_jsonl(spec.train_file)]
        if not train:
            raise ValueError("the training file has no examples")
        valid = (
            [build_example(tokenizer, line, spec.max_length) for line in read_jsonl(spec.valid_file)]
            if spec.valid_file
            else []
        )
        return Data(
            train=train,
            valid=[ex for ex in valid if ex.n_trained],
            trained_tokens=sum(ex.billable_tokens for ex in train) * spec.hyperparameters.n_epochs,
            run_key={**self.run_key, "n_train_examples": len(train)},
        )

    def prepare(self, m: Model, data: Data, *, saved: dict | None, should_stop) -> None:
        pass  # nothing to compute before the first step

    def state_extra(self) -> dict:
        return {}

    def normaliser(self, items: Sequence[Example]) -> float:
        return sum(ex.n_trained for ex in items)

    def micro_steps(
        self, m: Model, items: Sequence[Example], *, normaliser: float | None
    ) -> Iterator[tuple[list[float], int]]:
        for inputs, labels, n_real in micro_batches(list(items), m.pad_id):
            with m.autocast:
                ls, c = trained_token_loss(
                    m.decoder, m.lm_head, inputs.to(m.device), labels.to(m.device), m.softcap
                )
            if normaliser is not None:
                (ls / normaliser).backward()
            yield [ls.item(), c.item()], n_real

    def metrics(self, sums: list[float], n: float) -> dict[str, float]:
        loss, correct = sums
        return {"train_loss": loss / n, "train_mean_token_accuracy": correct / n}


def train(spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
    return run(spec, Supervised(spec), hooks)
