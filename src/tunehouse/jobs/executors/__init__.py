"""Executors run one phase of one job somewhere and let the worker watch and stop it.

- `local` (default): a child process on the worker's machine (`python -m tunehouse.jobs.runner`).
- `ray`: the same runner, started by a Ray task on a Ray cluster (`TUNEHOUSE_EXECUTOR=ray`,
  `TUNEHOUSE_RAY_ADDRESS`); see executors/ray.py.

Either way the runner itself watches the database (cancel, pause, a lost lease) and saves its
training state, so jobs behave the same wherever they run. The worker only needs to know whether
the phase is still running, and to ask it to stop (SIGTERM semantics: save state, then exit) or
force it to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tunehouse.jobs.executors.local import LocalExecutor


class Execution(Protocol):
    """One running phase."""

    def poll(self) -> int | None:
        """None while running; then the exit code (negative: killed by that signal)."""

    def terminate(self) -> None:
        """Ask it to stop cleanly: a training phase saves its state first."""

    def kill(self) -> None:
        """Stop it now."""

    def wait(self, timeout: float | None = None) -> int | None: ...


class Executor(Protocol):
    name: str

    def capabilities(self) -> dict:
        """What this executor can run: {"cpus": .., "gpus": .., "gpu_names": [..], "memory_gb": ..}."""

    def start(
        self, *, phase: str, job_id: str, worker_id: str, env: dict[str, str], log_path: Path, gpus: int
    ) -> Execution: ...

    def close(self) -> None: ...


def make_executor(settings) -> Executor:
    if settings.executor == "ray":
        # Imported only when asked for: ray is an optional extra (`tunehouse[ray]`).
        from tunehouse.jobs.executors.ray import RayExecutor

        return RayExecutor(settings)
    if settings.executor != "local":
        raise ValueError(f"TUNEHOUSE_EXECUTOR must be local or ray, not {settings.executor!r}")
    return LocalExecutor(settings)
