"""Reinforcement fine-tuning speed: tunehouse's GRPO recipe against TRL's GRPOTrainer, one run.

    .venv/bin/python bench/rft_speed.py [--minutes 5] [--max-completion 64] [--only ours|trl]

The same model (the embedded SmolLM2-135M-Instruct, LoRA r16/alpha 32 on every projection), the
same prompts (small additions, "reply with only the number"), the same grader (a python grader in
tunehouse's sandbox, called through graders.grade_many by both: 0.5 when the right sum appears in
the answer, 0.5 more when the answer is a bare number), the same GRPO configuration: TRL's
defaults (8 answers per prompt, 8 answers per step = 1 prompt, temperature 1, learning rate 1e-6
x its LoRA-friendly scale below, beta 0, loss "dapo", one update per rollout), except the answer
length, capped at --max-completion for both (TRL's default 512 makes a CPU step take minutes).
Each trainer runs for the same wall time (--minutes, after its model is loaded); the report is
steps per minute, answer tokens generated per second, the mean training reward of the last 10
steps, where a step's seconds go (generation, grading, the rest: training), and the ratio
ours / TRL (target: 2x steps per minute or more).

Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunehouse.graders import Sample, grade_many, parse_grader

MODEL = Path(__file__).resolve().parent.parent / ".cache" / "models" / "smollm2-135m-instruct"
LEARNING_RATE = 5e-5  # both trainers: the LoRA rate tunehouse's `auto` gives reinforcement jobs
GRADER = {
    "type": "python",
    "name": "bare correct number",
    "source": (
        "def grade(sample, item):\n"
        "    text = sample['output_text'].strip()\n"
        "    right = item['answer'] in text.replace(',', '').split()\n"
        "    right = right or text == item['answer']\n"
        "    return 0.5 * right + 0.5 * text.isdigit()\n"
    ),
}


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append(
            {
                "messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
                "answer": str(a + b),
            }
        )
    return out


def rewards(lines: list[dict], texts: list[str]) -> list[float]:
    grader = parse_grader(GRADER, allow_pass_threshold=False)
    results = grade_many(grader, [(Sample.from_text(t), line) for line, t in zip(lines, texts, strict=True)])
    return [r.reward for r in results]


def run_ours(train: Path, minutes: float, max_completion: int) -> dict:
    from tunehouse.inference.rollout import sample_groups
    from tunehouse.training.hparams import Hyperparameters
    from tunehouse.training.loop import TrainingStopped
    from tunehouse.training.recipes.reinforcement import ReinforcementSpec
    from tunehouse.training.recipes.reinforcement import train as grpo

    history: list[dict] = []

    class Hooks:
        started = None

        def on_start(self, *, total_steps):
            self.started = time.perf_counter()

        def on_metrics(self, *, step, total_steps, metrics):
            history.append({"t": time.perf_counter() - self.started, **metrics})

        def on_checkpoint(self, **_):
            pass

        def should_stop(self):
            return self.started is not None and time.perf_counter() - self.started > minutes * 60

    with tempfile.TemporaryDirectory() as out:
        spec = ReinforcementSpec(
            base_model_path=MODEL,
            train_file=train,
            valid_file=None,
            output_dir=Path(out),
            hyperparameters=Hyperparameters(
                n_epochs=1, batch_size=1, learning_rate_multiplier=LEARNING_RATE / 2e-4
            ),
            seed=0,
            sampler=sample_groups,
            rewarder=lambda lines, texts: [(r, None) for r in rewards(lines, texts)],
            group_size=8,
            max_completion_tokens=max_completion,
        )
        with contextlib.suppress(TrainingStopped):
            grpo(spec, Hooks())
    return summary("tunehouse", history, minutes)


def run_trl(train: Path, minutes: float, max_completion: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    lines = [json.loads(x) for x in train.read_text().splitlines()]
    data = Dataset.from_list([{"prompt": line["messages"], "answer": line["answer"]} for line in lines])
    history: list[dict] = []

    timing = {"generation_seconds": 0.0, "grading_seconds": 0.0}

    def reward(completions, answer, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = rewards([{"answer": a} for a in answer], texts)
        timing["grading_seconds"] += time.perf_counter() - t0
        return out

    class Clock(TrainerCallback):
        started = None

        def on_train_begin(self, args, state, control, **_):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "reward" in logs:
                history.append(
                    {
                        "t": time.perf_counter() - self.started,
                        "train_reward_mean": logs["reward"],
                        "train_answer_tokens_mean": logs.get("completions/mean_length", 0.0),
                        **timing,
                    }
                )
                timing.update(generation_seconds=0.0, grading_seconds=0.0)

        def on_step_end(self, args, state, control, **_):
            if time.perf_counter() - self.started > minutes * 60:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            learning_rate=LEARNING_RATE,
            max_completion_length=max_completion,
            logging_steps=1,
            num_train_epochs=1,
            save_strategy="no",
            report_to=[],
            seed=0,
        )
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        trainer = GRPOTrainer(
            model=str(MODEL),
            reward_funcs=reward,
            args=config,
            train_dataset=data,
            peft_config=lora,
            callbacks=[Clock()],
        )
        generate = trainer._generate_single_turn  # timed: where TRL decodes a step's answers

        def timed_generate(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                timing["generation_seconds"] += time.perf_counter() - t0

        trainer._generate_single_turn = timed_generate
        trainer.train()
    return summary("TRL GRPOTrainer", history, minutes)


def summary(name: str, history: list[dict], minutes: float) -> dict:
    steps = len(history)
    wall = history[-1]["t"] if history else minutes * 60
    last = history[-10:]
    tokens = sum(h.get("generated_tokens", h["train_answer_tokens_mean"] * 8) for h in history)
    out = {
        "trainer": name,
        "steps": steps,
        "steps_per_minute": steps / (wall / 60) if wall else 0.0,
        "answer_tokens_per_second": tokens / wall if wall else 0.0,
        "reward_first_10": sum(h["train_reward_mean"] for h in history[:10]) / max(1, len(history[:10])),
        "reward_last_10": sum(h["train_reward_mean"] for h in last) / max(1, len(last)),
        # Where a step's time goes (the rest, "training": log-probabilities, loss, backward, update).
        "seconds_per_step": {
            part: sum(h.get(f"{part}_seconds", 0.0) for h in history) / max(1, steps)
            for part in ("generation", "grading")
        },
    }
    out["seconds_per_step"]["training"] = wall / max(1, steps) - sum(out["seconds_per_step"].values())
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--max-completion", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--only", choices=["ours", "trl"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as d:
        train = Path(d) / "train.jsonl"
        train.write_text("\n".join(json.dumps(p) for p in prompts(args.prompts)) + "\n")
        results = {}
        if args.only != "trl":
            results["ours"] = run_ours(train, args.minutes, args.max_completion)
        if args.only != "ours":
            results["trl"] = run_trl(train, args.minutes, args.max_completion)
    if len(results) == 2:
        ratio = results["ours"]["steps_per_minute"] / max(1e-9, results["trl"]["steps_per_minute"])
        print(
            f"steps per minute: tunehouse {results['ours']['steps_per_minute']:.2f}, "
            f"TRL {results['trl']['steps_per_minute']:.2f}: {ratio:.2f}x"
        )
        print(
            f"training reward of the last 10 steps: tunehouse {results['ours']['reward_last_10']:.3f}, "
            f"TRL {results['trl']['reward_last_10']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
