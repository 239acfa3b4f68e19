"""The Ray executor (`pip install 'tunehouse[ray]'`, `TUNEHOUSE_EXECUTOR=ray`): each phase of a job
runs as a Ray task on a Ray cluster (`TUNEHOUSE_RAY_ADDRESS`, e.g. `ray://head:10001` or `auto`;
unset: a Ray instance started on this machine).

The task is a small supervisor that starts the very same runner as the local executor
(`python -m tunehouse.jobs.runner ...`) on the node Ray picked, with the GPUs Ray assigned
(CUDA_VISIBLE_DEVICES), and forwards a stop to it: `ray.cancel` raises KeyboardInterrupt in the task,
which sends the runner SIGTERM, so it saves its training state and exits, exactly as a local child
does. Cancel, pause, events, metrics and checkpoints go through the shared database and storage,
so they behave as with the local executor. A node that dies takes the runner with it (the runner
notices its parent is gone and writes nothing more); the job's lease then runs out and any worker
resumes it from its last saved state.

Each node needs tunehouse installed, the job's base model at the same path (TUNEHOUSE_MODELS_DIR,
TUNEHOUSE_BASE_MODELS), and the shared database and storage (TUNEHOUSE_DATABASE_URL,
TUNEHOUSE_STORAGE_URL): they are passed to the task from the worker's settings.

Several workers (data parallel): a job that needs N > 1 GPUs, or one that needs none when
`TUNEHOUSE_RAY_TRAIN_WORKERS` is N > 1, is trained by Ray Train's TorchTrainer with N workers on
one node (ScalingConfig(num_workers=N, use_gpu=..., placement_strategy="STRICT_PACK"), one GPU
each when the job needs GPUs). Each Ray Train worker starts the same runner with its rank and
rank 0's address (TUNEHOUSE_DP_* variables); the runners join one process group (NCCL on GPUs,
gloo on CPUs), the recipe splits every step's examples among them and sums the gradients, and
rank 0 alone records events, metrics, checkpoints and the training state, and tells the others
when to stop. A DPO job is trained by rank 0 alone. The workers share the node's home, so they
all resume from the state rank 0 put there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import traceback
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, TaskCancelledError

from tunehouse.jobs.context import DP_LOCAL_RANK, DP_MASTER, DP_RANK, DP_WORLD_SIZE
from tunehouse.jobs.executors.local import runner_command

STOP_GRACE_SECONDS = 10.0
# Settings and library switches the runner needs on the node; everything else (PATH,
# CUDA_VISIBLE_DEVICES, ...) is the node's own.
_FORWARDED_PREFIXES = ("TUNEHOUSE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "PYTORCH_")


def _supervise(phase: str, job_id: str, worker_id: str, env: dict[str, str], log_path: str) -> int:
    """Runs on a Ray node: the runner in a child process; a cancel becomes its SIGTERM."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            runner_command(phase, job_id, worker_id),
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=0.5)
    except BaseException:  # ray.cancel() (KeyboardInterrupt), or the Ray worker shutting down
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            return child.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            return child.wait()


def _supervise_data_parallel(
    job_id: str, worker_id: str, env: dict[str, str], log_path: str, num_workers: int, use_gpu: bool
) -> int:
    """Runs on a Ray node: the train phase with Ray Train's TorchTrainer, `num_workers` runners in
    one torch.distributed group. A cancel is passed on by the database (rank 0 polls it, as every
    runner does, and stops all ranks at the next step); after a grace period the trainer is left to
    Ray, and its runners exit once they see their launcher gone."""
    import tempfile
    import threading
    import uuid

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's own run folder: it checkpoints nothing of ours (the runners save their state).
    run_dir = Path(tempfile.gettempdir()) / "tunehouse-ray-train" / f"{job_id}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _data_parallel_worker,
        train_loop_config={"job_id": job_id, "worker_id": worker_id, "env": env, "log_path": log_path},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, placement_strategy="STRICT_PACK"
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=0),  # the worker retries, from the saved state
        ),
    )
    outcome: dict[str, int] = {}

    def fit() -> None:
        try:
            trainer.fit()
            outcome["code"] = 0
        except Exception:
            outcome["code"] = 1
            with contextlib.suppress(OSError), open(log_path, "a") as log:  # the job's train.log
                traceback.print_exc(file=log)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    thread = threading.Thread(target=fit, name=f"ray-train-{job_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except BaseException:  # ray.cancel(): the runners see the cancel or pause in the database
        thread.join(timeout=STOP_GRACE_SECONDS)
        return outcome.get("code", -signal.SIGTERM)
    return outcome.get("code", 1)


def _data_parallel_worker(config: dict) -> None:
    """One Ray Train worker: the runner, as rank `world_rank` of the job's process group. Ray
    Train's own group (set up by TorchTrainer) only passes rank 0's address and a fresh port on."""
    import socket

    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    where = [None]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        where = [(ray.util.get_node_ip_address(), port)]
    dist.broadcast_object_list(where, src=0)
    addr, port = where[0]
    env = {
        **os.environ,
        **config["env"],
        DP_RANK: str(rank),
        DP_WORLD_SIZE: str(world),
        DP_LOCAL_RANK: str(ctx.get_local_rank()),
        DP_MASTER: f"{addr}:{port}",
    }
    log_path = config["log_path"] if rank == 0 else f"{config['log_path']}.rank{rank}"
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            runner_command("train", config["job_id"], config["worker_id"]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        code = child.wait()
    finally:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    if code != 0:
        raise RuntimeError(f"training process {rank} of {world} exited with code {code}")


class RayExecution:
    def __init__(self, ref):
        self.ref = ref
        self.code: int | None = None
        self._cancelled = False

    def poll(self) -> int | None:
        if self.code is not None:
            return self.code
        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.code = int(ray.get(self.ref, timeout=10))
        except GetTimeoutError:
            return None
        except TaskCancelledError:
            self.code = -signal.SIGTERM
        except Exception:  # the task's process or node died: as if the runner had been killed
            self.code = -signal.SIGKILL
        return self.code

    def terminate(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            with contextlib.suppress(Exception):
                ray.cancel(self.ref, force=False)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=True)

    def wait(self, timeout: float | None = None) -> int | None:
        ray.wait([self.ref], timeout=timeout)
        return self.poll()


class RayExecutor:
    name = "ray"

    def __init__(self, settings):
        self.settings = settings
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        # max_retries=0: a task that dies is retried by the worker (with the job's attempt count
        # and its saved state), not replayed by Ray behind its back.
        self._task = ray.remote(max_retries=0)(_supervise)
        self._data_parallel = ray.remote(max_retries=0)(_supervise_data_parallel)

    def capabilities(self) -> dict:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0)) if self.settings.worker_gpus is None else self.settings.worker_gpus
        return {
            "cpus": int(res.get("CPU", 0)),
            "gpus": gpus,
            "gpu_names": [],
            "memory_gb": round(res.get("memory", 0) / 2**30, 1),
            "ray_nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        }

    def start(
        self, *, phase: str, job_id: str, worker_id: str, env: dict[str, str], log_path: Path, gpus: int
    ) -> RayExecution:
        forwarded = {k: v for k, v in env.items() if k.startswith(_FORWARDED_PREFIXES)}
        # One GPU per Ray Train worker; a CPU job gets TUNEHOUSE_RAY_TRAIN_WORKERS of them.
        workers = gpus if gpus > 0 else self.settings.ray_train_workers
        if phase == "train" and workers > 1:
            # The Ray Train workers reserve the CPUs and GPUs; this launcher needs none.
            ref = self._data_parallel.options(num_cpus=0).remote(
                job_id, worker_id, forwarded, str(log_path), workers, gpus > 0
            )
            return RayExecution(ref)
        ref = self._task.options(num_cpus=1, num_gpus=gpus if phase == "train" else 0).remote(
            phase, job_id, worker_id, forwarded, str(log_path)
        )
        return RayExecution(ref)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
