"""A worker: claims jobs from the queue and runs each phase (validate, train) in its own process
(a child of the worker, or a Ray task with the Ray executor: jobs/executors/), so the API stays
responsive and a cancel can stop training at once.

The worker registers itself in the `workers` table with what it can run (CPUs, GPUs, how many
training jobs at once) and heartbeats there and on the leases of its jobs; it claims only jobs it
can run (a job's `gpus_required`), notices cancellation (the API sets the status) and stops the
phase, and retries or fails a job whose phase died without finishing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tunehouse.config import Settings
from tunehouse.jobs import queue
from tunehouse.jobs import status as st
from tunehouse.jobs.executors import Execution, make_executor
from tunehouse.jobs.executors.local import LocalExecutor
from tunehouse.jobs.kinds import kind
from tunehouse.jobs.state_store import sweep_ended_jobs
from tunehouse.store.engine import Database, migrate

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
# How often a worker deletes the saved training states of jobs that ended while no training
# process held them (cancelled while queued or paused): state_store.sweep_ended_jobs.
SWEEP_SECONDS = 600.0
# A job whose phases have been started this many times (validation, training, resumes) and whose
# process then dies abnormally again fails instead of being retried.
MAX_ATTEMPTS = 8


@dataclass
class Running:
    job_id: str
    phase: str
    process: Execution
    log_path: Path
    stopping_since: float | None = None


def child_env(settings: Settings) -> dict[str, str]:
    """The child process sees the same settings as this worker, through TUNEHOUSE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env.update(settings.to_env())
    return env


class Worker:
    def __init__(self, settings: Settings, *, db: Database | None = None, concurrency: int | None = None):
        self.settings = settings
        self.db = db or Database(settings.db_url)
        self.concurrency = concurrency or settings.worker_concurrency
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, Running] = {}
        # Validation is short and reads the uploaded files: it always runs here. Training runs
        # where the executor says (a child process here, or a Ray task).
        self.local = LocalExecutor(settings)
        self.executor = self.local if settings.executor == "local" else make_executor(settings)
        self.capabilities = {**self.executor.capabilities(), "executor": self.executor.name}
        self.gpus = int(self.capabilities.get("gpus") or 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self._last_sweep = 0.0

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        queue.register_worker(
            self.db,
            worker_id=self.worker_id,
            host=socket.gethostname(),
            capabilities=self.capabilities,
            concurrency=self.concurrency,
        )
        self._last_heartbeat = time.time()
        log.info("worker %s offers %s", self.worker_id, self.capabilities)
        self._thread = threading.Thread(target=self._loop, name="tunehouse-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Graceful stop: children are asked to stop (a training process saves its state first)
        and their jobs handed back to the queue. Leases stay renewed until every child has exited,
        so no other worker can take a job while its process still runs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        runs = list(self.running.values())
        for run in runs:
            run.process.terminate()
        deadline = time.time() + STOP_GRACE_SECONDS
        while time.time() < deadline:
            alive = [r.job_id for r in runs if r.process.poll() is None]
            if not alive:
                break
            queue.renew(
                self.db, worker_id=self.worker_id, job_ids=alive, lease_seconds=self.settings.lease_seconds
            )
            time.sleep(0.2)
        for run in runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait(timeout=STOP_GRACE_SECONDS)
            queue.release(
                self.db,
                worker_id=self.worker_id,
                job_id=run.job_id,
                message="The server stopped; the job was put back in the queue",
            )
        self.running.clear()
        with contextlib.suppress(Exception):  # the database may be the reason we stop
            queue.worker_stopped(self.db, worker_id=self.worker_id)
        if self.executor is not self.local:
            self.executor.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive a database hiccup; the next tick retries
                log.exception("worker tick failed")
            self._stop.wait(self.settings.worker_poll_seconds)

    # --- one round -----------------------------------------------------------------------------
    def tick(self) -> None:
        self._reap()
        queue.renew(
            self.db,
            worker_id=self.worker_id,
            job_ids=list(self.running),
            lease_seconds=self.settings.lease_seconds,
        )
        # The workers table is for people and placement, not for leases: a few beats per lease.
        if time.time() - self._last_heartbeat > min(5.0, self.settings.lease_seconds / 3):
            queue.worker_heartbeat(self.db, worker_id=self.worker_id)
            self._last_heartbeat = time.time()
        self._stop_cancelled()
        if time.time() - self._last_sweep > SWEEP_SECONDS:
            self._last_sweep = time.time()
            try:
                sweep_ended_jobs(self.settings, self.db)
            except Exception:  # housekeeping: the next sweep retries
                log.warning("sweeping the training states of ended jobs failed", exc_info=True)
        # Validation is short and has its own slot, so a long training run never delays it.
        if not any(r.phase == "validate" for r in self.running.values()):
            self._claim_and_spawn("validate")
        while sum(r.phase == "train" for r in self.running.values()) < self.concurrency:
            if not self._claim_and_spawn("train"):
                break

    def _claim_and_spawn(self, phase: str) -> bool:
        job_id = queue.claim(
            self.db,
            worker_id=self.worker_id,
            phase=phase,
            lease_seconds=self.settings.lease_seconds,
            gpus=self.gpus if phase == "train" else None,
        )
        if job_id is None:
            return False
        job_dir = self.settings.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        log_path = job_dir / f"{phase}.log"
        executor = self.executor if phase == "train" else self.local
        try:
            process = executor.start(
                phase=phase,
                job_id=job_id,
                worker_id=self.worker_id,
                env=child_env(self.settings),
                log_path=log_path,
                gpus=queue.gpus_required(self.db, job_id) if phase == "train" else 0,
            )
        except Exception:
            # Could not start it (the Ray cluster went away, ...): hand the job back, to run again
            # after the backoff.
            log.exception("job %s: could not start %s", job_id, phase)
            if (attempts := queue.attempts(self.db, job_id)) < MAX_ATTEMPTS:
                delay = queue.retry_delay(self.settings.job_retry_seconds, attempts)
                queue.release(
                    self.db,
                    worker_id=self.worker_id,
                    job_id=job_id,
                    message=f"Could not start the job; retrying in {delay:g} s",
                    delay=delay,
                )
            else:
                queue.fail(
                    self.db,
                    job_id=job_id,
                    worker_id=self.worker_id,
                    code="server_error",
                    message=f"The job could not be started on the {executor.name} executor.",
                )
            return False
        self.running[job_id] = Running(job_id, phase, process, log_path)
        log.info("job %s: %s started on %s", job_id, phase, executor.name)
        return True

    def _reap(self) -> None:
        for job_id, run in list(self.running.items()):
            code = run.process.poll()
            if code is None:
                continue
            # We stopped it (cancel, pause, or the job was taken from us): nothing to record.
            # Otherwise record the outcome first; if the database is unreachable this raises and
            # the run stays listed (its lease renewed) until the next round can record it.
            if run.stopping_since is None:
                self._after_exit(job_id, run, code)
            del self.running[job_id]

    def _after_exit(self, job_id: str, run: Running, code: int) -> None:
        state = queue.job_state(self.db, job_id)
        if state is None or state[1] != self.worker_id or state[0] not in (st.VALIDATING, st.RUNNING):
            return  # the child recorded its outcome (queued, succeeded, failed, paused, ...)
        # The child ended without an outcome (killed, out of memory, a crash in native code, a
        # stray signal): run the phase again (training continues from its last saved state), a
        # few times, then fail clearly.
        job_kind = kind(queue.kind_of(self.db, job_id))
        what = job_kind.phase_names[run.phase]
        if code < 0 and -code == signal.SIGKILL:
            reason = f"the {what} process was killed (out of memory?)"
        else:
            reason = f"the {what} process exited unexpectedly (exit code {code})"
        attempts = queue.attempts(self.db, job_id)
        if attempts < MAX_ATTEMPTS:
            # Backing off: if the cause is passing (the database or storage unreachable from the
            # training process), a later start succeeds instead of the attempts running out at once.
            delay = queue.retry_delay(self.settings.job_retry_seconds, attempts)
            queue.release(
                self.db,
                worker_id=self.worker_id,
                job_id=job_id,
                message=f"Retrying in {delay:g} s: {reason} (attempt {attempts} of {MAX_ATTEMPTS})",
                delay=delay,
            )
            return
        tail = _log_tail(run.log_path)
        failed = queue.fail(
            self.db,
            job_id=job_id,
            worker_id=self.worker_id,
            code="server_error",
            message=f"The job failed because {reason}, after {attempts} attempts."
            + (f" Last log line: {tail}" if tail else ""),
        )
        if failed and run.phase == "train":
            job_kind.discard(
                self.settings, organization_id=queue.organization_of(self.db, job_id), job_id=job_id
            )

    def _stop_cancelled(self) -> None:
        for run in list(self.running.values()):
            state = queue.job_state(self.db, run.job_id)
            lost = state is None or state[1] != self.worker_id
            if run.stopping_since is None and (
                lost or state[0] in (st.CANCELLED, st.FAILED, st.SUCCEEDED, st.PAUSED)
            ):
                # Cancelled by the API (or taken from us): stop now; SIGTERM first so it can exit cleanly.
                run.stopping_since = time.time()
                run.process.terminate()
            elif run.stopping_since is not None and time.time() - run.stopping_since > STOP_GRACE_SECONDS:
                run.process.kill()


# Lines SQLAlchemy appends after an exception's own message: they say nothing about the cause.
_LOG_BOILERPLATE = ("(Background on this error at:", "[SQL:", "[parameters:")


def _log_tail(path: Path) -> str:
    """The last line of the log that says something (for a traceback: the exception's message)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith(_LOG_BOILERPLATE)]
    return lines[-1][-300:] if lines else ""


def run_forever(settings: Settings) -> None:
    """`tunehouse worker`: a worker on its own, sharing the database and home with a server."""
    settings.ensure_dirs()
    migrate(settings.db_url)
    worker = Worker(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.start()
    stop.wait()
    worker.stop()
