"""Measured training throughput on this machine, per base model, for time estimates.

Every finished job records its billable tokens per wall-clock second (model loading included, so
the estimate is what a user waits); estimates use a running average of those measurements.

Before the first job of a base model has finished on this machine there is no such measurement:
`probe` then measures it once, from a few LoRA training steps of that base on random tokens (the
same load, adapter, optimizer and autocast as training/loop.py), and caches the result beside the
measurements (throughput-probe.json). A measurement from a real job wins over the probe's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from tunehouse.hardware import resolve_device, resolve_dtype
from tunehouse.training.hparams import LORA_TARGET_MODULES

log = logging.getLogger(__name__)

_FILE = "throughput.json"
_PROBE_FILE = "throughput-probe.json"
_WEIGHT_NEW = 0.5  # running average: recent jobs matter as much as all earlier ones
PROBE_STEPS = 2  # timed steps, after one warm-up step
PROBE_TOKENS = 256  # tokens per step: batch x sequence


def _write(path: Path, data: dict[str, float]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record(home: Path, base_model: str, tokens_per_second: float) -> None:
    data = load_all(home)
    old = data.get(base_model)
    data[base_model] = tokens_per_second if old is None else old + _WEIGHT_NEW * (tokens_per_second - old)
    _write(home / _FILE, data)


def load_all(home: Path) -> dict[str, float]:
    return _read(home / _FILE)


def tokens_per_second(home: Path, base_model: str) -> float | None:
    """What finished jobs measured, else what the probe measured, else None."""
    measured = load_all(home).get(base_model)
    return measured if measured is not None else _read(home / _PROBE_FILE).get(base_model)


def ensure_measured(home: Path, base_model: str, base_path: Path, *, dtype: str = "auto") -> float | None:
    """The throughput of `base_model` on this machine, probing it first when nothing has measured it
    yet. None when the probe fails (the estimate is then left out; the job goes on)."""
    known = tokens_per_second(home, base_model)
    if known is not None:
        return known
    try:
        tps = probe(base_path, dtype=dtype)
    except Exception:
        log.warning("throughput probe of %s failed; no time estimate", base_model, exc_info=True)
        return None
    data = _read(home / _PROBE_FILE)
    data[base_model] = tps
    _write(home / _PROBE_FILE, data)
    log.info("throughput probe of %s: %.0f tokens/s", base_model, tps)
    return tps


def probe(base_path: Path, *, dtype: str = "auto", device: str = "auto", steps: int = PROBE_STEPS) -> float:
    """Training tokens per second of a LoRA adapter on `base_path`: random token sequences, one
    warm-up step, then `steps` timed forward + backward + AdamW steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, allow_fp16=False)
    config = AutoConfig.from_pretrained(base_path)
    seq = min(PROBE_TOKENS, int(getattr(config, "max_position_embeddings", PROBE_TOKENS) or PROBE_TOKENS))
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dt).to(dev)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGET_MODULES), task_type="CAUSAL_LM"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    batch = max(1, PROBE_TOKENS // seq)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(dev)
    autocast = torch.autocast(device_type=dev.type, dtype=dt, enabled=dt != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator, lazy init
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    loaded = time.monotonic()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.monotonic() - loaded
    log.debug(
        "probe: %d x %d tokens, %d steps in %.2f s (load %.2f s)",
        batch,
        seq,
        steps,
        elapsed,
        loaded - started,
    )
    return batch * seq * steps / elapsed
