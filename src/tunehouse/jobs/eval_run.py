"""The eval_run job kind: an eval run (evals/runs.py) executed as a job, so it has the queue,
leases, retries, crash resume and cancellation of every job. The job has the run's id.

    validate   nothing to do: a run's data was checked when it was created (it is created queued)
    train      generate and grade the items that have no output item yet (a restarted run does
               only the rest), then mark it succeeded with its counts, in one transaction that
               also queues the eval.run.succeeded webhook

Usage is metered as each item is written (evals/runs.py), so a cancelled or failed run pays for
the items it produced, and a resumed one never twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from tunehouse.evals import runs
from tunehouse.evals.generation import Generator
from tunehouse.jobs import queue
from tunehouse.jobs import status as st
from tunehouse.jobs.context import JobContext, JobGone
from tunehouse.jobs.events import add_event
from tunehouse.store.tables import Job, now
from tunehouse.webhooks.outbox import EVAL_RUN_SUCCEEDED, enqueue_job_event

log = logging.getLogger("tunehouse.runner")

# How often a running eval looks at its job's status (cancelled, taken over).
CHECK_SECONDS = 1.0


class EvalRunKind:
    """The "eval_run" job kind (jobs/kinds.py)."""

    name = "eval_run"
    phase_names = {"validate": "validation", "train": "eval run"}

    def validate(self, ctx: JobContext) -> None:
        with ctx.db.transaction() as s:
            s.execute(
                update(Job)
                .where(*ctx.mine(st.VALIDATING))
                .values(status=st.QUEUED, worker_id=None, lease_expires_at=None)
            )

    def train(self, ctx: JobContext) -> None:
        execute(ctx)

    def discard(self, settings, *, organization_id: str, job_id: str) -> None:
        """Nothing to discard: the output items written are the run's results, kept as they are."""


class StopCheck:
    """Whether the run must stop: SIGTERM from its worker, its job no longer running (cancelled)
    or no longer ours (taken over, deleted), or our worker gone. Called from several threads."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.requested = False
        self.gone = False
        self._parent = os.getppid()
        self._last = 0.0
        self._lock = threading.Lock()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_) -> None:
        self.requested = True

    def __call__(self) -> bool:
        if self.requested or self.gone:
            return True
        with self._lock:
            t = time.monotonic()
            if t - self._last < CHECK_SECONDS:
                return False
            self._last = t
            if os.getppid() != self._parent:
                self.gone = True
                return True
            try:
                state = queue.job_state(self.ctx.db, self.ctx.job_id)
            except OperationalError:
                log.warning("job %s: database unreachable; going on", self.ctx.job_id)
                return False
            if state is None or state[1] != self.ctx.worker_id:
                self.gone = True
            elif state[0] != st.RUNNING:
                self.requested = True
        return self.requested or self.gone


def execute(ctx: JobContext) -> None:
    job = ctx.load()
    stop = StopCheck(ctx)
    generator = Generator(ctx.settings)
    try:
        missing = runs.execute(
            ctx.db, ctx.settings, ctx.files, run_id=job.id, generator=generator, should_stop=stop
        )
    except runs.RunFailed as e:
        ctx.fail(code=e.code, message=e.message, param=e.param)
        return
    finally:
        generator.close()
    if stop.requested or stop.gone:
        log.info("job %s stopped", job.id)
        return
    if missing:
        # Not a stop and not a failure of the run: let the runner retry what is left.
        raise RuntimeError(f"{missing} items of the run have no output item")
    with ctx.db.transaction() as s:
        n = s.execute(
            update(Job)
            .where(*ctx.mine(st.RUNNING))
            .values(status=st.SUCCEEDED, finished_at=now(), worker_id=None, lease_expires_at=None)
        ).rowcount
        if not n:
            raise JobGone(ctx.job_id)
        runs.store_summary(s, job.id)
        add_event(s, job.id, "The eval run has completed")
        enqueue_job_event(
            s, job_id=job.id, event_type=EVAL_RUN_SUCCEEDED, organization_id=job.organization_id
        )
