"""The resumable training state of one run, on disk: what the shared loop (training/loop.py)
saves and loads, and what jobs/state_store.py copies to and from storage. No recipe logic here.

state_dir/
    adapter/        PEFT adapter (adapter_config.json + adapter_model.safetensors), fp32
    model/          instead of adapter/ for full fine-tuning: the whole model, fp32 safetensors
    trainer.pt      torch.save of {"optimizer", "scheduler", "rng"} state dicts (weights_only),
                    plus whatever a recipe adds (DPO: the reference log-probs)
    state.json      step, epoch, batch_in_epoch, metrics, last checkpoint, what the run was

A save writes a new folder <state_dir.name>.tmp-XXXX beside state_dir, fsyncs it, then swaps
it into place with one atomic rename (renameat2 RENAME_EXCHANGE on Linux), so a reader sees the
old complete state or the new one. Where the exchange is not available, the old state is
renamed aside to <name>.old-XXXX first; recover_state_dir puts it back if a crash fell between.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_ADAPTER = "adapter"
STATE_MODEL = "model"
STATE_TRAINER = "trainer.pt"
STATE_INFO = "state.json"


def read_state_info(state_dir: Path) -> dict | None:
    """The state.json of a saved state, or None when state_dir holds none."""
    path = Path(state_dir) / STATE_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("version") != STATE_VERSION:
        raise ValueError(
            f"{state_dir}: training state version {info.get('version')}, expected {STATE_VERSION}"
        )
    return info


def check_state_matches(info: dict, run_key: dict, state_dir: Path) -> None:
    """Refuse to continue a state saved for other data, seed or hyperparameters."""
    saved = info["run"]
    diff = sorted(k for k in run_key.keys() | saved.keys() if saved.get(k) != run_key.get(k))
    if diff:
        raise ValueError(
            f"the training state in {state_dir} was saved by a different run ({', '.join(diff)} differ); "
            "remove it or set resume=False to start over"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def capture_rng() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors and plain values (weights_only)."""
    import numpy as np
    import torch

    _, key, pos, has_gauss, gauss = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    import numpy as np
    import torch

    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_state(
    state_dir: Path,
    *,
    model,
    optimizer,
    scheduler,
    rng: dict,
    info: dict,
    weights: str = STATE_ADAPTER,
    extra: dict | None = None,
) -> None:
    """Write a complete state beside state_dir, then swap it into place atomically. `weights`:
    the folder name the model saves itself under; `extra`: more tensors for trainer.pt."""
    import torch

    state_dir = Path(state_dir)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{state_dir.name}.tmp-", dir=state_dir.parent))
    try:
        model.save_pretrained(tmp / weights)
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            **(extra or {}),
        }
        torch.save(trainer, tmp / STATE_TRAINER)
        (tmp / STATE_INFO).write_text(json.dumps(info, indent=2))
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
        publish_dir(tmp, state_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only by a failure, or the swapped-out old state


def publish_dir(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` at `dest` in one atomic step; the old `dest`, if any, ends
    up at `tmp` (the caller removes it)."""
    if not dest.exists():
        os.rename(tmp, dest)
    elif not exchange_paths(tmp, dest):
        old = Path(tempfile.mkdtemp(prefix=f"{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "state")
        os.rename(tmp, dest)
        os.rename(old / "state", tmp)
        old.rmdir()
    fsync_path(dest.parent)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    logger.debug("renameat2 exchange unavailable: %s", os.strerror(errno))
    return False


def recover_state_dir(state_dir: Path) -> None:
    """Clean what an interrupted save left beside state_dir: half-written <name>.tmp-* folders go;
    an old state renamed aside (<name>.old-*/state) goes back if state_dir itself is missing."""
    state_dir = Path(state_dir)
    if not state_dir.parent.is_dir():
        return
    for path in sorted(state_dir.parent.iterdir()):
        if path.name.startswith(f"{state_dir.name}.old-"):
            if not state_dir.exists() and (path / "state" / STATE_INFO).is_file():
                os.rename(path / "state", state_dir)
                logger.warning("recovered the training state in %s from %s", state_dir, path)
            shutil.rmtree(path, ignore_errors=True)
    for path in state_dir.parent.iterdir():
        if path.name.startswith(f"{state_dir.name}.tmp-"):
            shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def weights_dir(state_dir: Path, fine_tuning_type: str, *, check: bool = False) -> Path:
    """Where a state keeps its weights: adapter/ (LoRA) or model/ (full). With `check`, refuse a
    state saved with the other kind, before trying to load it."""
    path = Path(state_dir) / (STATE_MODEL if fine_tuning_type == "full" else STATE_ADAPTER)
    if check and not path.is_dir():
        raise ValueError(
            f"the training state in {state_dir} was saved by a different run (fine_tuning_type "
            "differs); remove it or set resume=False to start over"
        )
    return path
