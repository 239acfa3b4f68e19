"""What int8 serving costs in answers: each variant of the default model against fp32, same prompts.

    .venv/bin/python bench/int8_quality.py [--tokens 48]

For each prompt, fp32 answers greedily; every variant then reads the prompt plus fp32's answer, and
we report the mean KL divergence of its next-token distributions from fp32's, how often its top
token is fp32's, and how many tokens its own greedy answer shares with fp32's before they part.
Variants: bf16 (for scale: what the dtype alone changes) and int8 weights and activations with
fp32 around them (`tunehouse.inference.quantize`; what `TUNEHOUSE_INFERENCE_QUANTIZATION=int8`
serves). Each variant reads a whole answer in one pass: int8 quantizes each position (row) with
its own scale, as in decoding. Slow on CPUs that emulate bf16; no timings.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from serve_speed import PROMPTS as SERVE_PROMPTS  # bench/ is on the path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunehouse.config import Settings
from tunehouse.inference.quantize import CALIBRATION_CHAT, quantize_int8
from tunehouse.store.catalog import ensure_default_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    *SERVE_PROMPTS,
    "What is 17 times 23? Show your working.",
    "Give me a JSON object with keys name and age for a fictional person.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "models")
    args = parser.parse_args()
    base_dir = ensure_default_model(
        Settings(home=args.models_dir.parent / "home-unused", models_dir=args.models_dir)
    )
    tok = AutoTokenizer.from_pretrained(base_dir)

    def load(dtype):
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()

    calibration = tok(tok.apply_chat_template(CALIBRATION_CHAT, tokenize=False), add_special_tokens=False)
    variants = {"bf16": load(torch.bfloat16), "int8 weights and activations, fp32": load(torch.float32)}
    quantize_int8(variants["int8 weights and activations, fp32"], calibration["input_ids"])
    reference = load(torch.float32)

    scores: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    with torch.inference_mode():
        for prompt in PROMPTS:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            answer = reference.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            want = F.log_softmax(reference(answer).logits.float()[0, ids.shape[1] - 1 : -1], -1)
            for name, model in variants.items():
                got = F.log_softmax(model(answer).logits.float()[0, ids.shape[1] - 1 : -1], -1)
                kl = F.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean().item()
                top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
                own = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1] :]
                pairs = zip(own.tolist(), answer[0, ids.shape[1] :].tolist(), strict=False)
                shared = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(own), args.tokens))
                scores[name].append((kl, top1, shared))

    print(f"{len(PROMPTS)} prompts, {args.tokens} greedy tokens of fp32 each, against fp32\n")
    print(f"{'variant':40s} {'mean KL':>8s} {'top-1 agree':>12s} {'greedy prefix (median)':>24s}")
    for name, rows in scores.items():
        kl, top1, shared = zip(*rows, strict=True)
        print(
            f"{name:40s} {statistics.mean(kl):8.4f} {statistics.mean(top1):12.3f} {statistics.median(shared):24.1f}"
        )


if __name__ == "__main__":
    main()
