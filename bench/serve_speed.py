"""Serving speed: the tunehouse engine against plain transformers `generate`, same base, same run.

    .venv/bin/python bench/serve_speed.py [--tokens 64] [--streams 16]

1. One stream: tokens/s and time to first token, greedy, `--tokens` new tokens (end-of-turn banned
   with logit_bias on our side and `min_new_tokens` on the plain side, so both make the same count).
2. `--streams` concurrent streams spread over 4 LoRA adapters (random non-zero B weights, saved to a
   temporary folder: no training) on our engine, against plain `generate` with a batch of the same
   size on the base model alone: aggregate tokens/s, p50/p99 request latency.

Plain `generate` runs twice: with the model as `from_pretrained` loads it (fp32, what a user gets
by default) and in the engine's dtype (bf16 where the CPU has AMX), so the ratios show what comes
from the dtype and what from the batching. The base is the real default model, resolved through
`tunehouse.store.catalog` (converted from the installed GGUF once; no downloads). Timings on a shared
machine are noisy: the contenders are measured in turn, `--repeats` rounds, and each keeps its best;
compare ratios within one run. The last lines give the ratios against the faster of the two plain runs.

Our engine runs twice too: as served by default, and with `TUNEHOUSE_INFERENCE_QUANTIZATION=int8`
(int8 weights and activations, fp32 around them, whatever the CPU; `--no-int8` leaves it out).
Its prefix cache is on, as served by default: the warm-up requests and each round's requests leave
their prompts' beginnings in it (the chat template's default system prompt, shared by every prompt;
from the second round, whole prompts but their last token), so prefills compute less than plain
`generate`'s, which has no such cache. `--prefix-cache-mb 0` measures without it.

Each contender lives in a process of its own. In one process they would slow each other down: once
two threads have run multi-threaded torch ops (plain `generate` in the main thread, our engine in its
scheduler thread), libgomp counts more OpenMP threads than cores and throttles its spin-waiting, so
every parallel op of either pays a thread wake-up (a bf16 matmul of one row: 40 → 95 µs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from tunehouse.config import Settings
from tunehouse.inference.engine import Delta, ModelRef, SamplingParams, Usage
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.quantize import int8_supported
from tunehouse.store.catalog import ensure_default_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how a refrigerator works to a ten year old.",
    "List some tips for staying focused while studying.",
    "Describe the city of Paris in spring.",
]


def make_adapters(base_dir: Path, out: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # zero at init: make each adapter change the outputs
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        peft_model.save_pretrained(out / f"adapter{i}")
        paths.append(out / f"adapter{i}")
    return paths


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# ---- plain transformers generate ------------------------------------------------------------------


def best(runs: list[dict]) -> dict:
    """The fastest of several runs of one configuration (a shared machine only ever slows things)."""
    return {
        "dtype": runs[0]["dtype"],
        "ttft": min(r["ttft"] for r in runs),
        "one_tps": max(r["one_tps"] for r in runs),
        "many_tps": max(r["many_tps"] for r in runs),
        "p50": min(r["p50"] for r in runs),
        "p99": min(r["p99"] for r in runs),
    }


class Plain:
    """Plain transformers `generate` on the base model, loaded as `from_pretrained` gives it or in `dtype`."""

    def __init__(self, base_dir: Path, dtype, tokens: int, streams: int, threads: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.dtype = dtype or torch.float32

        self.tok = AutoTokenizer.from_pretrained(base_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            base_dir, **({"dtype": dtype} if dtype else {})
        ).eval()
        self.tokens, self.streams = tokens, streams
        self.texts = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": PROMPTS[i % 4]}], tokenize=False, add_generation_prompt=True
            )
            for i in range(streams)
        ]
        self.run(self.texts[:1], 4)  # warm-up

    def run(self, batch: list[str], new: int) -> float:
        enc = self.tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.generate(
                **enc,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
        return time.perf_counter() - t0

    def measure(self) -> dict:
        ttft = self.run(self.texts[:1], 1)
        one = self.run(self.texts[:1], self.tokens)
        many = self.run(self.texts, self.tokens)
        return {
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "ttft": ttft,
            "one_tps": self.tokens / one,
            "many_tps": self.streams * self.tokens / many,
            "p50": many,  # a batch finishes all at once
            "p99": many,
        }

    def close(self) -> None:
        self.model = None


# ---- the tunehouse engine ------------------------------------------------------------------------


def timed_request(
    engine: HFEngine, model: ModelRef, prompt: list[int], params: SamplingParams
) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    for item in engine.stream(model, prompt, params):
        if isinstance(item, Delta) and item.text and first is None:
            first = time.perf_counter() - t0
        if isinstance(item, Usage):
            tokens = item.completion_tokens
    return first or 0.0, time.perf_counter() - t0, tokens


class Contender:
    """A contender in a process of its own (see the module's docstring), measured on request."""

    def __init__(self, factory, *args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_contender, args=(child, factory, args), daemon=True)
        self.process.start()
        self.info = self._reply()

    def _reply(self):
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def measure(self) -> dict:
        self.conn.send("measure")
        return self._reply()

    def close(self) -> None:
        self.conn.send("close")
        self.process.join(timeout=60)


def _serve_contender(conn, factory, args) -> None:
    try:
        contender = factory(*args)
        conn.send({"dtype": str(getattr(contender, "dtype", ""))})
        while conn.recv() == "measure":
            conn.send(contender.measure())
        contender.close()
    except BaseException as e:  # sent to the parent, which raises it
        conn.send(e)


class Ours:
    """The tunehouse engine: the base model for one stream, 4 adapters for the concurrent streams."""

    def __init__(
        self,
        base_dir: Path,
        adapters: list[Path],
        tokens: int,
        streams: int,
        threads: int = 0,
        quantization="none",
        prefix_cache_mb: int = 256,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.engine = engine = HFEngine(quantization=quantization, prefix_cache_mb=prefix_cache_mb)
        self.dtype = engine.dtype
        self.streams = streams
        self.base = ModelRef("base", base_dir)
        eos = sorted(engine._base(base_dir).eos_ids)
        self.params = SamplingParams(temperature=0, max_tokens=tokens, logit_bias=dict.fromkeys(eos, -100.0))
        self.prompts = [engine.encode_chat(self.base, [{"role": "user", "content": p}]) for p in PROMPTS]
        timed_request(
            engine, self.base, self.prompts[0], SamplingParams(temperature=0, max_tokens=4)
        )  # warm-up
        self.refs = [ModelRef(f"ft{i}", base_dir, a) for i, a in enumerate(adapters)]
        for r in self.refs:  # load the adapters (cached afterwards, as in a running server)
            timed_request(engine, r, self.prompts[0], SamplingParams(temperature=0, max_tokens=2))

    def measure(self) -> dict:
        ttft, total, n = timed_request(self.engine, self.base, self.prompts[0], self.params)
        results: list[tuple[float, float, int]] = [None] * self.streams  # type: ignore[list-item]

        def client(i: int) -> None:
            ref, prompt = self.refs[i % len(self.refs)], self.prompts[(i // len(self.refs)) % 4]
            results[i] = timed_request(self.engine, ref, prompt, self.params)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        latencies = [r[1] for r in results]
        return {
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "ttft": ttft,
            "one_tps": n / total,
            "many_tps": sum(r[2] for r in results) / wall,
            "p50": statistics.median(latencies),
            "p99": pct(latencies, 0.99),
        }

    def close(self) -> None:
        self.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both sides (0: torch's default, one per core); on a machine other jobs "
        "load, 1 avoids OpenMP threads spinning while they wait for a busy core",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of measurements; each contender keeps its best"
    )
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "models")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8-weights engine")
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="our engine's prefix cache (0: off; 256: the default)",
    )
    args = parser.parse_args()

    base_dir = ensure_default_model(
        Settings(home=args.models_dir.parent / "home-unused", models_dir=args.models_dir)
    )
    print(
        f"base {base_dir}, {args.tokens} new tokens per request, torch threads {torch.get_num_threads()}, "
        f"our prefix cache {args.prefix_cache_mb} MB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base_dir, Path(tmp), 4)

        def ours(quantization: str) -> Contender:
            return Contender(
                Ours,
                base_dir,
                adapters,
                args.tokens,
                args.streams,
                args.threads,
                quantization,
                args.prefix_cache_mb,
            )

        contenders = {"tunehouse": ours("none")}
        engine_dtype = contenders["tunehouse"].info["dtype"].removeprefix("torch.")
        if int8_supported(torch.device("cpu")) and not args.no_int8:
            contenders["tunehouse int8"] = ours("int8")
        contenders["plain generate (default fp32)"] = Contender(
            Plain, base_dir, None, args.tokens, args.streams, args.threads
        )
        if engine_dtype != "float32":
            contenders[f"plain generate ({engine_dtype})"] = Contender(
                Plain, base_dir, getattr(torch, engine_dtype), args.tokens, args.streams, args.threads
            )
        # Round-robin, so that a burst of load from other jobs hits every contender alike.
        measured: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, contender in contenders.items():
                measured[name].append(contender.measure())
        for contender in contenders.values():
            contender.close()
    ours = {
        f"tunehouse ({best(measured[name])['dtype']}{' int8' if name.endswith('int8') else ''}, 4 adapters)": best(
            measured.pop(name)
        )
        for name in [n for n in measured if n.startswith("tunehouse")]
    }
    runs = {name: best(m) for name, m in measured.items()}

    print(
        f"\n{'':40} {'1 stream tok/s':>14} {'TTFT s':>7} {args.streams:>3} streams tok/s {'p50 s':>7} {'p99 s':>7}"
    )
    for name, r in {**ours, **runs}.items():
        print(
            f"{name:40} {r['one_tps']:14.1f} {r['ttft']:7.3f} {r['many_tps']:17.1f} {r['p50']:7.2f} {r['p99']:7.2f}"
        )
    # The honest baseline: whichever plain configuration was faster, separately for each target.
    one = max(runs, key=lambda k: runs[k]["one_tps"])
    many = max(runs, key=lambda k: runs[k]["many_tps"])
    for name, us in ours.items():
        print(
            f"{name} against the faster plain generate: one stream {us['one_tps'] / runs[one]['one_tps']:.2f}x "
            f"(target 2x, vs {one}), {args.streams} streams over 4 adapters "
            f"{us['many_tps'] / runs[many]['many_tps']:.2f}x (target 1.5x, vs {many})"
        )


if __name__ == "__main__":
    main()
