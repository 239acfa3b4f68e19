"""What the machine's processor can do fast; shared by training and serving when they pick a dtype."""

from __future__ import annotations

import contextlib


def cpu_has_fast_bf16() -> bool:
    """AMX tiles (Sapphire Rapids+) or AVX512-BF16 (Cooper Lake, Zen 4+): oneDNN runs bf16 matmuls
    natively there, 2-6x faster than fp32. Elsewhere bf16 is emulated: 3-5x slower than fp32."""
    import torch  # lazily: the CLI and API import this module without needing torch loaded

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        with contextlib.suppress(Exception):
            if fn is not None and fn():
                return True
    return False
