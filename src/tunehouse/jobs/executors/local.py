"""The local executor: each phase in a child process of the worker, in its own session (a Ctrl-C on
the server's terminal is handled by the worker, not the child)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


class LocalExecution:
    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def runner_command(phase: str, job_id: str, worker_id: str) -> list[str]:
    return [sys.executable, "-m", "tunehouse.jobs.runner", phase, job_id, worker_id]


class LocalExecutor:
    name = "local"

    def __init__(self, settings):
        self.settings = settings

    def capabilities(self) -> dict:
        return local_capabilities(self.settings.worker_gpus)

    def start(
        self, *, phase: str, job_id: str, worker_id: str, env: dict[str, str], log_path: Path, gpus: int
    ) -> LocalExecution:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                runner_command(phase, job_id, worker_id),
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return LocalExecution(process)

    def close(self) -> None:
        pass


def local_capabilities(gpus: int | None) -> dict:
    """This machine: CPU cores, memory, and its CUDA GPUs (or `gpus` when the operator says so)."""
    names: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: a CPU worker
        names = []
    memory_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": len(names) if gpus is None else gpus,
        "gpu_names": names[: len(names) if gpus is None else gpus],
        "memory_gb": memory_gb,
    }
