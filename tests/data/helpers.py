"""Building blocks for training-data tests: good examples and files written from lines."""

from __future__ import annotations

import json
from pathlib import Path


def good(i: int = 0) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"Question number {i}: what colour is the sky?"},
            {"role": "assistant", "content": f"Blue ({i})."},
        ]
    }


def good_pref(i: int = 0) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"Say hello number {i}."}]},
        "preferred_output": [{"role": "assistant", "content": f"Hello {i}!"}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }


def line(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)


def write_lines(path: Path, lines: list, *, newline: str = "\n", final_newline: bool = True) -> Path:
    text = newline.join(line(x) for x in lines)
    if final_newline:
        text += newline
    path.write_bytes(text.encode("utf-8"))
    return path


def with_bad_line(path: Path, bad, *, at: int = 5, n_good: int = 12, make=good) -> Path:
    """n_good good lines with `bad` inserted so that it is line `at` (1-based)."""
    lines = [make(i) for i in range(n_good)]
    lines.insert(at - 1, bad)
    return write_lines(path, lines)
