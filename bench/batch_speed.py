"""Batch speed: the same chat requests as one batch (/v1/batches) against one by one through the API.

    .venv/bin/python bench/batch_speed.py [--requests 200] [--max-tokens 32] [--model default|tiny]

A tunehouse server in a child process (its own home, the default model SmolLM2-135M-Instruct,
SQLite; started as bench/eval_speed.py starts it). `--requests` short prompts ("What is 17 + 25?
Answer with the number only.") are answered twice, greedy, `--max-tokens` new tokens at most:
- one by one: `client.chat.completions.create` for each in turn, the way a script without a batch
  API would do it (the server's engine warmed up first);
- as one batch: the same bodies as a JSONL file of purpose `batch`, `client.batches.create`,
  timed from the file's upload until the batch is completed: queueing, the batch job's own engine
  load in the worker's process, batched generation, writing each line and the output file.
The answers of the two ways are compared (greedy: they should agree), and the last line is the
ratio of the two wall times (target: 3x or more).

Timings on a shared machine are noisy: compare the ratio within one run, not across machines.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import ADMIN_KEY, questions, start_server  # noqa: E402


def bench(n: int, max_tokens: int, model_choice: str) -> None:
    from openai import OpenAI

    model = "tiny" if model_choice == "tiny" else "smollm2-135m-instruct"
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": item["question"]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for item in questions(n)
    ]
    home = Path(tempfile.mkdtemp(prefix="tunehouse-batchbench-"))
    server, base_url = start_server(home, model_choice)
    try:
        client = OpenAI(base_url=base_url, api_key=ADMIN_KEY, max_retries=0, timeout=600)
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

        t = time.perf_counter()
        direct = []
        for i, body in enumerate(bodies, start=1):
            direct.append(client.chat.completions.create(**body).choices[0].message.content)
            if i % 25 == 0:
                print(f"  one by one: {i}/{n} after {time.perf_counter() - t:.1f} s", flush=True)
        one_by_one = time.perf_counter() - t

        t = time.perf_counter()
        data = "".join(
            json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": b})
            + "\n"
            for i, b in enumerate(bodies)
        ).encode()
        f = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        as_batch = time.perf_counter() - t
        if batch.status != "completed":
            raise SystemExit(f"the batch ended {batch.status}: {batch.errors}")
        out = {}
        for line in client.files.content(batch.output_file_id).text.splitlines():
            row = json.loads(line)
            out[row["custom_id"]] = row["response"]["body"]["choices"][0]["message"]["content"]
        same = sum(out.get(f"q{i}") == text for i, text in enumerate(direct))

        print(f"\n{n} chat requests, {model}, greedy, max {max_tokens} new tokens")
        print(f"  one by one through chat:  {one_by_one:8.1f} s  ({n / one_by_one:6.2f} requests/s)")
        print(
            f"  one batch:                {as_batch:8.1f} s  ({n / as_batch:6.2f} requests/s), "
            f"completed {batch.request_counts.completed}/{batch.request_counts.total}, "
            f"answers equal to the one-by-one ones: {same}/{n}"
        )
        print(f"  batch vs one by one:      {one_by_one / as_batch:.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    args = ap.parse_args()
    bench(args.requests, args.max_tokens, args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
