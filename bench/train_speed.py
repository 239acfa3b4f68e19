"""Training throughput of the supervised recipe against a plain TRL `SFTTrainer`, same model, same data.

    python bench/train_speed.py [--data synthetic|tickets|PATH] [--steps 4] [--warmup-steps 1]
                                [--batch-size 8] [--threads N] [--models-dir .cache/models]

Fine-tunes the default base model (SmolLM2-135M-Instruct) with the same LoRA adapter (r=16,
alpha=32 on q,k,v,o,gate,up,down) on the same `steps x batch_size` chat examples, two ways, each in
its own subprocess so peak RSS is per method:

* baseline: TRL's `SFTTrainer` as a user would write it: an OpenAI "messages" dataset, a
  `LoraConfig`, fp32 (`bf16=False`: TRL's bf16=True default refuses to start on a CPU-only
  machine), batch 8 padded to the longest row, no packing, `max_steps`, `logging_steps=1`,
  `report_to="none"`. TRL defaults kept, and the ones that matter for speed or loss:
  `gradient_checkpointing=True` (an extra forward per step), `assistant_only_loss=False` (loss on
  every token, full [B, L, 49k] logits), `padding_free=False`, `max_length=1024`, linear decay
  without warm-up, fused AdamW. The only change: `learning_rate` is the recipe's 2e-4 (the usual
  LoRA rate; TRL's default 2e-5 is a full fine-tuning rate) so the held-out losses compare the
  implementations, not two learning rates. `--baseline-lr 2e-5` restores TRL's default.
* ours: `tunehouse.training.recipes.supervised.train` with n_epochs=1 over the same file (so the
  same number of steps), batch 8, learning_rate_multiplier 1 (2e-4), dtype auto (bf16 frozen
  weights where the CPU has AVX512-BF16/AMX), no validation file (no evaluation inside the timing).

Throughput counts real tokens only: every token of the chat-template rendering of each example
(what OpenAI bills), no padding, over the steps after the first --warmup-steps. Step time is from
the end of one optimizer step to the end of the next (batch assembly included). After both runs the
held-out loss (mean cross-entropy over assistant tokens, fp32, full logits, one example at a time)
is computed by the same function for the base model and both adapters, and the adapters are checked
for non-zero LoRA B matrices (they start at zero, so non-zero means gradients flowed). The bf16 and
fp32 2048x2048 matmul rates of this CPU are printed as the ceiling to compare against.
Not a test: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPE_LR = 2e-4  # tunehouse.training.hparams.BASE_LEARNING_RATE (multiplier 1)

# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

TOPICS = {
    "billing": [
        "invoice",
        "refund",
        "charge",
        "card",
        "payment",
        "plan",
        "subscription",
        "receipt",
        "discount",
        "tax",
        "renewal",
    ],
    "shipping": [
        "parcel",
        "courier",
        "tracking",
        "delivery",
        "warehouse",
        "address",
        "label",
        "customs",
        "pallet",
        "route",
    ],
    "account": [
        "password",
        "login",
        "email",
        "profile",
        "session",
        "token",
        "username",
        "reset",
        "device",
        "security",
    ],
    "hardware": [
        "battery",
        "screen",
        "charger",
        "cable",
        "fan",
        "keyboard",
        "sensor",
        "firmware",
        "port",
        "speaker",
    ],
    "software": [
        "update",
        "crash",
        "install",
        "plugin",
        "version",
        "config",
        "cache",
        "server",
        "query",
        "timeout",
    ],
}
FILLER = [
    "the",
    "a",
    "our",
    "my",
    "this",
    "that",
    "it",
    "is",
    "was",
    "has",
    "been",
    "will",
    "can",
    "should",
    "please",
    "also",
    "then",
    "when",
    "after",
    "before",
    "with",
    "without",
    "for",
    "from",
    "into",
    "about",
    "again",
    "still",
    "only",
    "just",
    "very",
    "really",
    "yesterday",
    "today",
]


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    out = [rng.choice(words) if rng.random() < 0.45 else rng.choice(FILLER) for _ in range(n)]
    return " ".join(out).capitalize() + "."


def synthetic_example(rng: random.Random) -> dict:
    """A support conversation of 50-600 tokens (log-uniform), half of it the assistant's answer.

    Learnable structure: the answer opens with a fixed header naming the topic of the user's words
    and reuses that topic's vocabulary, so the held-out loss can fall within a few steps.
    """
    topic = rng.choice(sorted(TOPICS))
    words = TOPICS[topic]
    total_words = int(math.exp(rng.uniform(math.log(25), math.log(430))))  # ~1.35 tokens a word
    user_words = max(5, int(total_words * rng.uniform(0.3, 0.6)))
    answer_words = max(4, total_words - user_words)

    def text(n: int) -> str:
        parts = []
        while n > 0:
            k = min(n, rng.randint(6, 16))
            parts.append(_sentence(rng, words, k))
            n -= k
        return " ".join(parts)

    return {
        "messages": [
            {"role": "system", "content": "You are a support agent. Classify, then answer."},
            {"role": "user", "content": text(user_words)},
            {"role": "assistant", "content": f"Topic: {topic}.\n" + text(answer_words)},
        ]
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_data(args, workdir: Path) -> tuple[Path, Path, str]:
    """train.jsonl with exactly steps x batch_size examples, valid.jsonl held out."""
    n_train = args.steps * args.batch_size
    repo = Path(__file__).resolve().parent.parent
    if args.data == "synthetic":
        rng = random.Random(args.seed)
        train = [synthetic_example(rng) for _ in range(n_train)]
        valid = [synthetic_example(rng) for _ in range(args.valid_examples)]
        label = f"synthetic ({n_train} train, {len(valid)} held out, 50-600 tokens)"
    else:
        path = repo / "examples" / "tickets_train.jsonl" if args.data == "tickets" else Path(args.data)
        rows = read_jsonl(path)
        if args.data == "tickets":
            valid = read_jsonl(repo / "examples" / "tickets_valid.jsonl")[: args.valid_examples]
        else:  # a held-out split from the end of the file
            rows, valid = rows[: -args.valid_examples], rows[-args.valid_examples :]
        if len(rows) < n_train:
            raise SystemExit(f"{path} has {len(rows)} training examples, need steps x batch = {n_train}")
        train = rows[:n_train]
        label = f"{path.name} (first {n_train}, {len(valid)} held out)"
    write_jsonl(workdir / "train.jsonl", train)
    write_jsonl(workdir / "valid.jsonl", valid)
    return workdir / "train.jsonl", workdir / "valid.jsonl", label


# ----------------------------------------------------------------------------------------------
# the two methods, each run in a child process
# ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_baseline(cfg: dict) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ends: list[float] = []
    tokens: list[tuple[int, int]] = []  # (real, padded) per batch, in order

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    dataset = load_dataset("json", data_files=cfg["train_file"], split="train")
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    args = SFTConfig(
        output_dir=cfg["out"],
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["steps"],
        learning_rate=cfg["baseline_lr"],
        bf16=False,
        logging_steps=1,
        report_to="none",
        seed=cfg["seed"],
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
        callbacks=[Clock()],
    )
    collate = trainer.data_collator

    def counting_collate(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        tokens.append((real, int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = counting_collate
    trainer.train()
    rss = peak_rss_mb()
    trainer.model.save_pretrained(cfg["out"] + "/adapter")
    return {
        "step_ends": ends,
        "tokens": tokens[: cfg["steps"]],
        "peak_rss_mb": rss,
        "dtype": str(next(p for p in trainer.model.parameters() if not p.requires_grad).dtype),
        "notes": f"grad ckpt={args.gradient_checkpointing}, assistant_only_loss={args.assistant_only_loss}",
        "adapter": cfg["out"] + "/adapter",
    }


def run_ours(cfg: dict) -> dict:
    from tunehouse.hardware import resolve_device, resolve_dtype
    from tunehouse.training import loop
    from tunehouse.training.hparams import BASE_LEARNING_RATE, Hyperparameters
    from tunehouse.training.recipes import supervised

    ends: list[float] = []
    tokens: list[tuple[int, int]] = []
    inner = supervised.micro_batches

    def counting_micro_batches(examples, pad_id):
        # One call per optimizer step (no validation file, so no evaluation calls).
        real, padded = sum(ex.billable_tokens for ex in examples if ex.n_trained), 0
        for inputs, labels, n_real in inner(examples, pad_id):
            padded += inputs.numel()
            yield inputs, labels, n_real
        tokens.append((real, padded))

    supervised.micro_batches = counting_micro_batches  # the recipe looks it up per call

    class Hooks:
        def on_start(self, *, total_steps):
            ends.append(time.perf_counter())

        def on_metrics(self, *, step, total_steps, metrics):
            ends.append(time.perf_counter())

        def on_checkpoint(self, *, step, path, metrics, is_final):
            pass

        def should_stop(self):
            return False

    spec = loop.TrainSpec(
        base_model_path=Path(cfg["model"]),
        train_file=Path(cfg["train_file"]),
        valid_file=None,
        output_dir=Path(cfg["out"]),
        hyperparameters=Hyperparameters(
            n_epochs=1, batch_size=cfg["batch_size"], learning_rate_multiplier=RECIPE_LR / BASE_LEARNING_RATE
        ),
        seed=cfg["seed"],
    )
    captured: dict[str, float] = {}
    original_save = loop.save_checkpoint

    def save_after_rss(*a, **k):
        captured["rss"] = peak_rss_mb()  # before saving, as for the baseline
        return original_save(*a, **k)

    loop.save_checkpoint = save_after_rss  # the loop looks it up per call
    result = supervised.train(spec, Hooks())
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device), allow_fp16=False)
    return {
        "step_ends": ends,
        "tokens": tokens,
        "peak_rss_mb": captured.get("rss", peak_rss_mb()),
        "dtype": str(dtype),
        "notes": "no grad ckpt, assistant-only loss, logits only at trained positions",
        "adapter": str(result.final_adapter_path),
        "steps": result.steps,
    }


def child_main(method: str, cfg_path: Path) -> None:
    import torch

    cfg = json.loads(cfg_path.read_text())
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = run_baseline(cfg) if method == "baseline" else run_ours(cfg)
    out["threads"] = torch.get_num_threads()
    Path(cfg["result"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# shared measurements (parent process)
# ----------------------------------------------------------------------------------------------


def matmul_tflops(dtype, n: int = 2048, reps: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def heldout_loss(model_path: str, valid_file: Path, adapter: str | None) -> float:
    """Mean cross-entropy over the assistant tokens of the held-out file: fp32, full logits, one
    example at a time, the assistant mask from the chat template (tunehouse.data.chat)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunehouse.data.chat import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for line in read_jsonl(valid_file):
            tok = tokenize_chat(tokenizer, line)
            ids = torch.tensor([tok.input_ids])
            targets = torch.tensor(
                [t if m else -100 for t, m in zip(tok.input_ids, tok.trained, strict=True)]
            )
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss_sum += F.cross_entropy(logits, targets[1:], reduction="sum", ignore_index=-100).item()
            n += int((targets[1:] != -100).sum())
    return loss_sum / max(1, n)


def lora_check(adapter: str) -> tuple[int, int, int, float]:
    """(modules with LoRA, of which B non-zero, distinct target kinds, mean |B|)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    bs = {k: v for k, v in weights.items() if "lora_B" in k}
    kinds = {k.split(".lora_B")[0].rsplit(".", 1)[-1] for k in bs}
    nonzero = sum(int(v.abs().sum() > 0) for v in bs.values())
    mean_abs = sum(float(v.abs().mean()) for v in bs.values()) / max(1, len(bs))
    return len(bs), nonzero, len(kinds), mean_abs


def throughput(res: dict, warmup: int) -> dict:
    durations = [b - a for a, b in zip(res["step_ends"], res["step_ends"][1:], strict=False)]
    measured = list(zip(durations, res["tokens"], strict=False))[warmup:]
    seconds = sum(d for d, _ in measured)
    real = sum(t[0] for _, t in measured)
    padded = sum(t[1] for _, t in measured)
    return {
        "steps": len(measured),
        "seconds": seconds,
        "real": real,
        "padded": padded,
        "tok_s": real / seconds if seconds else float("nan"),
        "all_real": sum(t[0] for t in res["tokens"]),
        "step_s": [round(d, 2) for d in durations],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="synthetic", help="synthetic, tickets, or a chat JSONL path")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps for each method")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    parser.add_argument("--valid-examples", type=int, default=12)
    parser.add_argument("--baseline-lr", type=float, default=RECIPE_LR, help="TRL's own default is 2e-5")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=["baseline", "ours"], help="run one method only")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.config)
        return
    if args.warmup_steps >= args.steps:
        parser.error("--steps must be larger than --warmup-steps")

    from tunehouse.config import Settings
    from tunehouse.store.catalog import ensure_default_model

    model = ensure_default_model(Settings(models_dir=args.models_dir))
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="train_speed_")
    workdir = args.keep or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    train_file, valid_file, label = prepare_data(args, workdir)
    print(f"model {model}\ndata  {label}; {args.steps} steps x batch {args.batch_size}, "
          f"first {args.warmup_steps} step(s) not timed")  # fmt: skip

    results: dict[str, dict] = {}
    for method in ("baseline", "ours"):
        if args.only and method != args.only:
            continue
        cfg = {
            "model": str(model),
            "train_file": str(train_file),
            "out": str(workdir / method),
            "result": str(workdir / f"{method}.json"),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "seed": args.seed,
            "baseline_lr": args.baseline_lr,
        }
        (workdir / f"{method}.cfg.json").write_text(json.dumps(cfg))
        log = workdir / f"{method}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--config",
                str(workdir / f"{method}.cfg.json"),
            ]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode:
            print(log.read_text()[-4000:])
            raise SystemExit(f"{method} failed (exit {proc.returncode}), log above")
        results[method] = json.loads((workdir / f"{method}.json").read_text())
        results[method]["wall"] = time.perf_counter() - start
        print(f"  {method} done in {results[method]['wall']:.0f}s (load, train, save)", flush=True)

    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    fp32, bf16 = matmul_tflops(torch.float32), matmul_tflops(torch.bfloat16)
    base_loss = heldout_loss(str(model), valid_file, None)

    rows = []
    for method, res in results.items():
        t = throughput(res, args.warmup_steps)
        n_b, nonzero, kinds, mean_b = lora_check(res["adapter"])
        loss = heldout_loss(str(model), valid_file, res["adapter"])
        rows.append((method, res, t, loss, f"{nonzero}/{n_b} ({kinds} kinds, mean|B| {mean_b:.1e})"))

    print()
    head = f"{'method':9} {'dtype':15} {'thr':>3} {'steps':>5} {'real tok':>8} {'padded':>7} {'pad%':>5} "
    head += f"{'sec':>6} {'real tok/s':>10} {'peak RSS':>9} {'held-out':>8}  LoRA B non-zero"
    print(head)
    for method, res, t, loss, check in rows:
        pad = 100 * (1 - t["real"] / t["padded"]) if t["padded"] else 0.0
        print(
            f"{method:9} {res['dtype']:15} {res['threads']:>3} {t['steps']:>5} {t['real']:>8} "
            f"{t['padded']:>7} {pad:>4.0f}% {t['seconds']:>6.1f} {t['tok_s']:>10.1f} "
            f"{res['peak_rss_mb']:>6.0f} MB {loss:>8.4f}  {check}"
        )
    print(f"{'base':9} {'(no adapter)':15} {'':>3} {'':>5} {'':>8} {'':>7} {'':>5} {'':>6} {'':>10} "
          f"{'':>9} {base_loss:>8.4f}")  # fmt: skip
    for method, res, t, _loss, _check in rows:
        print(
            f"  {method}: step seconds {t['step_s']}; real tokens over all steps {t['all_real']}; {res['notes']}"
        )
    if len(rows) == 2:
        ratio = rows[1][2]["tok_s"] / rows[0][2]["tok_s"]
        print(f"\nratio ours/baseline (real tokens/s): {ratio:.2f}x")
        if rows[0][2]["all_real"] != rows[1][2]["all_real"]:
            print("  note: the two methods counted different real-token totals over all steps")
    print(f"CPU matmul 2048x2048: fp32 {fp32:.3f} TFLOP/s, bf16 {bf16:.3f} TFLOP/s ({bf16 / fp32:.1f}x)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
