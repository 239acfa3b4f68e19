"""Building blocks shared by the training tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

COLORS = [
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "pink",
    "brown",
    "gray",
    "gold",
]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class Recorder:
    """TrainHooks that remember everything; optionally asks to stop after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.total_steps: int | None = None
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path, bool]] = []
        self.stop_after = stop_after
        self.stop_asked_at: float | None = None

    def on_start(self, *, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_metrics(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))

    def on_checkpoint(self, *, step: int, path: Path, metrics: dict[str, float], is_final: bool) -> None:
        self.checkpoints.append((step, path, is_final))

    def should_stop(self) -> bool:
        if self.stop_after is not None and len(self.metrics) >= self.stop_after:
            self.stop_asked_at = self.stop_asked_at or time.monotonic()
            return True
        return False

    def losses(self) -> list[float]:
        return [m["train_loss"] for _, m in self.metrics]
