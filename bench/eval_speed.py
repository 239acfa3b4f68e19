"""Eval speed: graders' items per second, and an eval run against the same items sent one by one.

    .venv/bin/python bench/eval_speed.py [--items 200] [--max-tokens 16] [--grade-items 300]
                                         [--model default|tiny] [--skip-graders]
                                         [--temperature 0] [--seed S]

1. Graders, in this process: `grade_many` over `--grade-items` (sample, item) pairs for every
   deterministic grader type (string_check, each text_similarity metric, python in its sandbox,
   multi): items graded per second.
2. A tunehouse server in a child process (its own home, the default model, SQLite). The same
   `--items` questions ("What is 17 + 25? Answer with the number only.") are answered twice:
   - one by one: `client.chat.completions.create` for each item in turn, greedy (or at
     `--temperature` with `--seed`, as OpenAI's eval examples sample), `--max-tokens`,
     the way a script without an eval API would do it (the server's engine warmed up first);
   - as one eval run: `client.evals.create` + `client.evals.runs.create` with a `completions`
     data source (the same template, greedy, the same max tokens) and a string_check criterion,
     timed from the create call until the run is completed: queueing, the run's own engine load
     in the worker's process, batched generation, grading and storing every output item.
   The last line is the ratio of the two wall times (target: 3x or more).

Timings on a shared machine are noisy: compare the ratio within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_injection import MODELS_DIR, build_tiny_model, free_port  # noqa: E402

from tunehouse.graders import Sample, grade_many, parse_grader  # noqa: E402

ADMIN_KEY = "sk-bench-admin"


def questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append({"question": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)})
    return out


def bench_graders(n: int) -> None:
    rng = random.Random(1)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "small",
        "birds",
        "sing",
    ]
    pairs = []
    for _ in range(n):
        ref = " ".join(rng.sample(words, 8))
        out = " ".join(rng.sample(words, 8))
        pairs.append((Sample.from_text(out), {"reference": ref}))
    base = {"input": "{{sample.output_text}}", "reference": "{{item.reference}}"}
    graders = {"string_check eq": {"type": "string_check", "operation": "eq", **base}}
    for metric in ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_l", "cosine"):
        graders[f"text_similarity {metric}"] = {
            "type": "text_similarity",
            "evaluation_metric": metric,
            **base,
        }
    graders["python"] = {
        "type": "python",
        "source": "def grade(sample, item):\n    return float(sample['output_text'] == item['reference'])\n",
    }
    graders["multi"] = {
        "type": "multi",
        "graders": {
            "a": {"type": "string_check", "name": "a", "operation": "ilike", **base},
            "b": {"type": "text_similarity", "name": "b", "evaluation_metric": "fuzzy_match", **base},
        },
        "calculate_output": "0.5 * a + 0.5 * b",
    }
    print(f"graders: items graded per second ({n} items each)")
    for name, spec in graders.items():
        grader = parse_grader({"name": name, **spec})
        batch = pairs if name != "python" else pairs[: max(20, n // 5)]
        grade_many(grader, batch[:2])  # warm-up: model and data loads are one-offs
        t = time.perf_counter()
        results = grade_many(grader, batch)
        dt = time.perf_counter() - t
        errors = sum(r.errored for r in results)
        print(f"  {name:28s} {len(batch) / dt:10.1f} items/s" + (f"  ({errors} errored)" if errors else ""))


def start_server(home: Path, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        TUNEHOUSE_HOME=str(home),
        TUNEHOUSE_MODELS_DIR=str(MODELS_DIR),
        TUNEHOUSE_ADMIN_KEY=ADMIN_KEY,
        TOKENIZERS_PARALLELISM="false",
    )
    if model == "tiny":
        env["TUNEHOUSE_BASE_MODELS"] = json.dumps({"tiny": str(build_tiny_model())})
    log = open(home / "server.log", "ab")  # noqa: SIM115 - kept by the child
    server = subprocess.Popen(
        [sys.executable, "-m", "tunehouse", "serve", "--port", str(port), "--home", str(home)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        except urllib.error.HTTPError:
            break  # 401: it answers
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start; see " + str(home / "server.log")) from None
            time.sleep(0.3)
        else:
            break
    return server, f"http://127.0.0.1:{port}/v1"


def bench_run(n: int, max_tokens: int, model_choice: str, temperature: float, seed: int | None) -> None:
    from openai import OpenAI

    model = "tiny" if model_choice == "tiny" else "smollm2-135m-instruct"
    items = questions(n)
    home = Path(tempfile.mkdtemp(prefix="tunehouse-evalbench-"))
    server, base_url = start_server(home, model_choice)
    try:
        client = OpenAI(base_url=base_url, api_key=ADMIN_KEY, max_retries=0, timeout=600)
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

        t = time.perf_counter()
        one_by_one_right = 0
        for item in items:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": item["question"]}],
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
            )
            one_by_one_right += item["answer"] in (reply.choices[0].message.content or "")
        one_by_one = time.perf_counter() - t

        t = time.perf_counter()
        ev = client.evals.create(
            name="sums",
            data_source_config={
                "type": "custom",
                "item_schema": {
                    "type": "object",
                    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                    "required": ["question", "answer"],
                },
                "include_sample_schema": True,
            },
            testing_criteria=[
                {
                    "type": "string_check",
                    "name": "contains the sum",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}",
                    "operation": "like",
                }
            ],
        )
        run = client.evals.runs.create(
            ev.id,
            name="batched",
            data_source={
                "type": "completions",
                "model": model,
                "input_messages": {
                    "type": "template",
                    "template": [{"role": "user", "content": "{{item.question}}"}],
                },
                "sampling_params": {
                    "temperature": temperature,
                    "max_completion_tokens": max_tokens,
                    **({"seed": seed} if seed is not None else {}),
                },
                "source": {"type": "file_content", "content": [{"item": item} for item in items]},
            },
        )
        while run.status not in ("completed", "failed", "canceled"):
            time.sleep(0.25)
            run = client.evals.runs.retrieve(run.id, eval_id=ev.id)
        as_run = time.perf_counter() - t
        if run.status != "completed":
            raise SystemExit(f"the eval run ended {run.status}: {run.error}")
        how = "greedy" if temperature == 0 else f"temperature {temperature}, seed {seed}"
        print(f"\n{n} items, {model}, {how}, max {max_tokens} new tokens")
        print(
            f"  one by one through chat:  {one_by_one:8.1f} s  ({n / one_by_one:6.2f} items/s), right: {one_by_one_right}"
        )
        print(
            f"  one eval run:             {as_run:8.1f} s  ({n / as_run:6.2f} items/s), "
            f"passed: {run.result_counts.passed}/{run.result_counts.total}, errored: {run.result_counts.errored}"
        )
        print(f"  eval run vs one by one:   {one_by_one / as_run:.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--grade-items", type=int, default=300)
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--skip-graders", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if not args.skip_graders:
        bench_graders(args.grade_items)
    bench_run(args.items, args.max_tokens, args.model, args.temperature, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
