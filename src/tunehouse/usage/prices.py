"""The price table: USD per million tokens, by model pattern.

Defaults are OpenAI's published GPT-4o fine-tuning prices (2024-08): training $25, input $3.75 and
output $15 per 1M tokens. `TUNEHOUSE_PRICES` (JSON) overrides them per model pattern; a pattern
that leaves a field out takes the default for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from tunehouse.config import Settings

DEFAULT_TRAINING = 25.0
DEFAULT_INPUT = 3.75
DEFAULT_OUTPUT = 15.0
# Requests run through the Batches API (/v1/batches) cost this share of the inference prices
# (OpenAI's batch discount: 50%).
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Price:
    training: float = DEFAULT_TRAINING  # per 1M billable training tokens
    input: float = DEFAULT_INPUT  # per 1M prompt tokens
    output: float = DEFAULT_OUTPUT  # per 1M completion tokens

    def inference_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6

    def batch_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.inference_cost(prompt_tokens, completion_tokens) * BATCH_DISCOUNT

    def training_cost(self, tokens: int) -> float:
        return tokens * self.training / 1e6


def price_for(settings: Settings, model: str) -> Price:
    """The exact model name first, then the patterns in the order given; else the defaults."""
    table = settings.prices or {}
    entry = table.get(model)
    if entry is None:
        entry = next((v for k, v in table.items() if fnmatchcase(model, k)), None)
    if not entry:
        return Price()
    return Price(
        training=float(entry.get("training", DEFAULT_TRAINING)),
        input=float(entry.get("input", DEFAULT_INPUT)),
        output=float(entry.get("output", DEFAULT_OUTPUT)),
    )
