"""Native CPU kernels for serving, compiled on first use with the machine's C++ compiler.

`decode_attention` is the attention of a decode step (see `decode_attention.cpp`): PyTorch has no
kernel that reads a position-major KV cache at memory speed on a CPU, and there is no maintained
package with one for our torch. It is built once per machine through PyTorch's own extension
builder (`torch.utils.cpp_extension.load`: g++ and ninja, ~20 s, cached under
`$TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions, and rebuilt when the source
changes), for this CPU (`-march=native`). Where it cannot be built (no compiler, or
`TUNEHOUSE_NATIVE_KERNELS=0`), callers keep PyTorch's ops: the same results, slower.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_lock = threading.Lock()
_loaded: dict[str, Callable | None] = {}


def decode_attention() -> Callable | None:
    """`torch.ops.tunehouse_native.decode_attention(q, k, v, mask, scale)`, or None where it cannot
    be built here. q [rows, heads, head dim], k and v [rows, KV heads, length, head dim] (any
    strides but a contiguous head dim), all float32 on the CPU; mask [rows, length] added to the
    scores (-inf over padding) or None; head dim 16, 32, 64 or 128. Returns [rows, heads * head dim]."""
    with _lock:
        if "decode_attention" not in _loaded:
            _loaded["decode_attention"] = _build()
        return _loaded["decode_attention"]


def _build() -> Callable | None:
    if os.environ.get("TUNEHOUSE_NATIVE_KERNELS", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        log.warning("no C++ compiler or ninja: decode attention stays on PyTorch's (slower) ops")
        return None
    from torch.utils.cpp_extension import load

    try:
        load(
            name="tunehouse_native",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP: torch's own libgomp, already loaded
            is_python_module=False,
            verbose=False,
        )
    except Exception:
        log.warning("building the native decode attention failed; using PyTorch's ops", exc_info=True)
        return None
    return torch.ops.tunehouse_native.decode_attention
