"""Where models run and in what precision: one answer for training and serving.

`resolve_device` and `resolve_dtype` turn the settings' strings ("auto", "cpu", "cuda:1", "bf16",
"float32", ...) into torch objects; `auto` picks bf16 wherever the hardware computes it natively
(`cpu_has_fast_bf16` for CPUs), fp32 elsewhere. This is the base layer: torch and the standard
library only, nothing of tunehouse.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
"""The dtype names the settings accept besides "auto"."""


def cpu_has_fast_bf16() -> bool:
    """AMX tiles (Sapphire Rapids+) or AVX512-BF16 (Cooper Lake, Zen 4+): oneDNN runs bf16 matmuls
    natively there, 2-6x faster than fp32. Elsewhere bf16 is emulated: 3-5x slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        with contextlib.suppress(Exception):
            if fn is not None and fn():
                return True
    return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: the GPU where CUDA is available, else the CPU; anything else as torch reads it
    ("cpu", "cuda", "cuda:1"; an unknown name raises torch's RuntimeError)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str | torch.device, *, allow_fp16: bool = True) -> torch.dtype:
    """The torch dtype for a name of `DTYPES`, or for `auto` the fastest exact-enough one on
    `device`: bf16 on CUDA GPUs that have it and on CPUs with native bf16 (`cpu_has_fast_bf16`),
    fp32 everywhere else. `allow_fp16=False` refuses float16 (training: fp16 would need loss
    scaling, and a GPU without bf16 does better in fp32). Raises ValueError for other names."""
    names = {k: v for k, v in DTYPES.items() if allow_fp16 or v != torch.float16}
    if dtype != "auto":
        try:
            return names[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}") from None
    kind = resolve_device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32
