"""OpenAI's `auto` number of epochs, a function of the data set's size alone (REFERENCE §6.5).

It lives with the data check, which estimates a job's billable tokens (epochs x tokens) before
any training; the training side's hyperparameter rules (training/hparams.py) use it from here.
"""

from __future__ import annotations

# OpenAI cookbook ("Data preparation and analysis for chat model fine-tuning"): aim for ~3 passes
# over the data, but see at least 100 and at most 25,000 examples in total, within 1..25 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def auto_n_epochs(n_examples: int) -> int:
    """The OpenAI cookbook rule: 3 epochs, more for tiny sets (up to 25), fewer for huge ones."""
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS
