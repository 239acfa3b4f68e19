"""Measured training throughput on this machine, per base model, for time estimates.

Every finished job records its billable tokens per wall-clock second (model loading included, so
the estimate is what a user waits); estimates use a running average of those measurements.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_FILE = "throughput.json"
_WEIGHT_NEW = 0.5  # running average: recent jobs matter as much as all earlier ones


def record(home: Path, base_model: str, tokens_per_second: float) -> None:
    path = home / _FILE
    data = load_all(home)
    old = data.get(base_model)
    data[base_model] = tokens_per_second if old is None else old + _WEIGHT_NEW * (tokens_per_second - old)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_all(home: Path) -> dict[str, float]:
    try:
        return json.loads((home / _FILE).read_text())
    except (OSError, ValueError):
        return {}


def tokens_per_second(home: Path, base_model: str) -> float | None:
    return load_all(home).get(base_model)
