"""Throughput and peak memory of the pure format check (`validate_file`) on a large generated file.

    python bench/validate_speed.py [--examples 200000] [--keep PATH] [--model-dir DIR --analyze 5000]

Prints examples/s, MB/s and the peak resident set size; the file mixes plain chat lines, multi-turn
lines with weight 0, tool-call lines and text-part lines (roughly what real files hold), and a few
bad lines so the error path is exercised too. With --model-dir (a Hugging Face folder with a
tokenizer, e.g. .cache/models/smollm2-135m-instruct) it also times the token analysis (chat
template, duplicates) on the first --analyze examples. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from tunehouse.data.validation import validate_file

WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "cats",
    "dogs",
    "weather",
    "code",
    "travel",
    "food",
    "music",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def example(rng: random.Random, i: int) -> dict:
    kind = i % 4
    system = {"role": "system", "content": "You are a helpful assistant."}
    if kind == 0:
        return {
            "messages": [
                system,
                {"role": "user", "content": sentence(rng, 20)},
                {"role": "assistant", "content": sentence(rng, 60)},
            ]
        }
    if kind == 1:
        return {
            "messages": [
                system,
                {"role": "user", "content": sentence(rng, 15)},
                {"role": "assistant", "content": sentence(rng, 30), "weight": 0},
                {"role": "user", "content": sentence(rng, 10)},
                {"role": "assistant", "content": sentence(rng, 40), "weight": 1},
            ]
        }
    if kind == 2:
        return {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "weather for a city",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            ],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"temp_c": 21}'},
                {"role": "assistant", "content": sentence(rng, 20)},
            ],
        }
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": sentence(rng, 25)}]},
            {"role": "assistant", "content": sentence(rng, 50)},
        ]
    }


def generate(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 10_000 == 9_999:
                f.write('{"messages": [{"role": "user", "content": "broken"}\n')  # invalid JSON
            else:
                f.write(json.dumps(example(rng, i), ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--keep", type=Path, help="write the generated file here and keep it")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, help="also time the token analysis with this tokenizer")
    ap.add_argument("--analyze", type=int, default=5000, help="examples for the token analysis")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "big.jsonl"
        if not path.exists():
            t = time.perf_counter()
            generate(path, args.examples)
            print(f"generated {args.examples:,} examples in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        size_mb = path.stat().st_size / 1e6
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            report = validate_file(path)
            best = min(best, time.perf_counter() - t)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"file:            {path.name}, {size_mb:,.1f} MB, {report.n_examples:,} examples")
        print(f"problems:        {report.n_errors:,} errors, {report.n_warnings:,} warnings")
        print(
            f"format check:    {report.n_examples / best:,.0f} examples/s, {size_mb / best:,.1f} MB/s (best of {args.repeat})"
        )
        print(f"peak RSS:        {rss_after:,.0f} MB (before the check: {rss_before:,.0f} MB)")
        if args.model_dir:
            analyze_speed(path, args.model_dir, args.analyze, Path(tmp))


def analyze_speed(path: Path, model_dir: Path, n: int, tmp: Path) -> None:
    from transformers import AutoTokenizer

    from tunehouse.data.analysis import check_files

    small = tmp / "head.jsonl"
    with open(path, "rb") as src, open(small, "wb") as dst:
        for i, raw in enumerate(src):
            if i >= n:
                break
            dst.write(raw)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t = time.perf_counter()
    report = check_files(small, validation=None, tokenizer=tokenizer)
    took = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"token analysis:  {report.n_examples / took:,.0f} examples/s on {report.n_examples:,} examples "
        f"({report.stats['tokens_per_example']['total'] / took:,.0f} tokens/s); peak RSS now {rss:,.0f} MB"
    )


if __name__ == "__main__":
    main()
