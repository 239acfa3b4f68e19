"""Native CPU ops for the decode step, compiled on first use with the machine's C++ compiler.

`decode_ops.cpp` holds them: the attention of a decode step (PyTorch has no kernel that reads a
position-major KV cache at memory speed on a CPU, and there is no maintained package with one for
our torch), and the RMS norm and int8 input preparation, one pass each where ATen takes five to
seven small ops. They are built once per machine through PyTorch's own extension builder
(`torch.utils.cpp_extension.load`: a C++ compiler and ninja, ~20 s, cached under
`$TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions, and rebuilt when the source
changes; see `_build_directory`), for this CPU (`-march=native`). Where they cannot be built (no compiler, or
`TUNEHOUSE_NATIVE_KERNELS=0`), callers keep PyTorch's ops: the same results, slower.

The ops, on CPU float32 tensors (`torch.ops.tunehouse_native.<name>`):
- `decode_attention(q, k, v, mask, scale)`: q [rows, heads, head dim], k and v [rows, KV heads,
  length, head dim] (any strides but a contiguous head dim), mask [rows, length] added to the
  scores (-inf over padding) or None; head dim 16, 32, 64 or 128. Returns [rows, heads * head dim].
- `rms_norm(x, weight, eps)`: x [rows, hidden] → `F.rms_norm(x, (hidden,), weight, eps)`.
- `int8_inputs(x, keep, outliers)`: what an int8 layer group's matmuls read (see
  `tunehouse.inference.quantize.SharedInput.matmul`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_ops.cpp")
_lock = threading.Lock()
_built: list[Any] = []  # [the ops namespace, or None where it could not be built], once tried


def native_ops() -> Any | None:
    """`torch.ops.tunehouse_native`, built on the first call; None where it cannot be built here."""
    with _lock:
        if not _built:
            _built.append(_build())
        return _built[0]


def _build() -> Any | None:
    if os.environ.get("TUNEHOUSE_NATIVE_KERNELS", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        log.warning("no C++ compiler or ninja: the decode step stays on PyTorch's (slower) ops")
        return None
    from torch.utils.cpp_extension import load

    try:
        load(
            name="tunehouse_native",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP: torch's own libgomp, already loaded
            build_directory=str(_build_directory()),
            is_python_module=False,
            verbose=False,
        )
    except Exception:
        log.warning("building the native decode ops failed; using PyTorch's ops", exc_info=True)
        return None
    return torch.ops.tunehouse_native


def _build_directory() -> Path:
    """Where the build goes, one folder per Python and torch version (as torch's default is).

    PyTorch's builder takes a lock file there while it compiles, and a process that finds one
    waits for it to go, forever: a build killed midway (a stopped server, a timed-out test) would
    leave every later start waiting. A build takes ~20 s, so a lock older than 10 minutes is such
    a leftover, and is removed."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    folder = Path(root) / tag / "tunehouse_native"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > 600:
            log.warning("removing a stale build lock left by an interrupted build: %s", lock)
            lock.unlink()
    return folder
