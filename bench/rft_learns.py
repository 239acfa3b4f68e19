"""Does reinforcement fine-tuning learn? A real job on the embedded default model, through the API.

    .venv/bin/python bench/rft_learns.py [--train 48] [--valid 16] [--epochs 2] [--batch 4]
                                         [--lr-multiplier 1.0] [--max-completion 48]

A tunehouse server in a child process (its own home, SmolLM2-135M-Instruct) gets a
`method: reinforcement` job through the official SDK: prompts "What is a + b? Reply with only the
number." (a, b in 1..20), graded by the python grader of bench/rft_speed.py (0.5 when the right sum
is in the answer, 0.5 more when the answer is a bare number). The job measures the validation
reward (one greedy answer per held-out prompt) before training and every few steps; this prints
those figures, the training rewards, and for the base and the fine-tune how many held-out answers
hold the right sum and how many are a bare number (the reward's two halves), with five of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import ADMIN_KEY, start_server  # noqa: E402
from rft_speed import GRADER, prompts  # noqa: E402

MODEL = "smollm2-135m-instruct"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--valid", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr-multiplier", type=float, default=1.0)
    ap.add_argument("--max-completion", type=int, default=48)
    args = ap.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        server, base_url = start_server(home, "default")
        try:
            client = OpenAI(base_url=base_url, api_key=ADMIN_KEY, timeout=600)
            lines = prompts(args.train + args.valid, seed=7)
            files = {}
            for name, part in (("train", lines[: args.train]), ("valid", lines[args.train :])):
                path = home / f"{name}.jsonl"
                path.write_text("\n".join(json.dumps(x) for x in part) + "\n")
                files[name] = client.files.create(file=path.open("rb"), purpose="fine-tune").id
            t0 = time.time()
            job = client.fine_tuning.jobs.create(
                model=MODEL,
                training_file=files["train"],
                validation_file=files["valid"],
                seed=1,
                method={
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": GRADER,
                        "hyperparameters": {
                            "n_epochs": args.epochs,
                            "batch_size": args.batch,
                            "learning_rate_multiplier": args.lr_multiplier,
                            "eval_interval": 4,
                            "eval_samples": args.valid,
                            "max_completion_tokens": args.max_completion,
                        },
                    },
                },
            )
            seen = 0
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(5)
                job = client.fine_tuning.jobs.retrieve(job.id)
                events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data[::-1]
                for e in events[seen:]:
                    if e.type == "metrics":
                        print(e.message, flush=True)
                seen = len(events)
            wall = time.time() - t0
            print(f"job {job.status} in {wall:.0f} s", job.error or "")
            if job.status != "succeeded":
                return 1
            metrics = [
                e.data
                for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                if e.type == "metrics"
            ]
            metrics.sort(key=lambda m: m["step"])
            base = metrics[0]["base_valid_reward"]
            valid = [(m["step"], m["valid_reward"]) for m in metrics if "valid_reward" in m]
            print(
                f"validation reward (greedy, {args.valid} held-out prompts): base {base:.3f}; "
                + ", ".join(f"step {s} {r:.3f}" for s, r in valid)
            )
            print(
                f"final full validation reward {metrics[-1].get('full_valid_reward', float('nan')):.3f} "
                f"after {metrics[-1]['step']} steps"
            )
            # The reward's two halves, over every held-out prompt: which one the model learned.
            held_out = lines[args.train :]
            for who, model in (("base", MODEL), ("fine-tuned", job.fine_tuned_model)):
                answers = [
                    client.chat.completions.create(
                        model=model, messages=x["messages"], temperature=0, max_tokens=args.max_completion
                    )
                    .choices[0]
                    .message.content.strip()
                    for x in held_out
                ]
                right = sum(
                    x["answer"] in a.replace(",", "").split() or a == x["answer"]
                    for x, a in zip(held_out, answers, strict=True)
                )
                bare = sum(a.isdigit() for a in answers)
                print(
                    f"{who}: right sum in {right}/{len(answers)} answers, a bare number in "
                    f"{bare}/{len(answers)}; the first five: {json.dumps(answers[:5])}"
                )
        finally:
            server.terminate()
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
