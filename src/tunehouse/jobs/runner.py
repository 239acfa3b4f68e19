"""One phase of one job, in a child process of a worker: `python -m tunehouse.jobs.runner
{validate|train} JOB_ID WORKER_ID`. The job's kind (jobs/kinds.py) says what the phase does; what
happens when it raises (a retry, or a clear failure) is the same for every kind.
"""

from __future__ import annotations

import logging
import sys

from sqlalchemy.exc import OperationalError

from tunehouse.config import Settings
from tunehouse.jobs import queue
from tunehouse.jobs.context import JobContext, JobGone
from tunehouse.jobs.kinds import PHASES, kind
from tunehouse.store.blobs import is_disk_full

log = logging.getLogger("tunehouse.runner")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    phase, job_id, worker_id = argv
    if phase not in PHASES:
        raise SystemExit(f"unknown phase {phase!r}")
    ctx = JobContext(Settings(), job_id, worker_id)
    try:
        job_kind = kind(ctx.load().kind)
        getattr(job_kind, phase)(ctx)
    except JobGone:
        log.info("job %s is no longer ours; exiting", job_id)
    except Exception as e:
        log.exception("job %s: %s failed", job_id, phase)
        if ctx.rank > 0:
            return 1  # rank 0 (or the launcher) records what happened to the job
        return _after_error(ctx, phase, e)
    return 0


# A training process that raised is run again this many times in all (from its last saved state)
# before the job fails: an error may be passing (a network filesystem, a GPU reset).
# Counted like the worker counts (every start, validation included).
TRAIN_ERROR_ATTEMPTS = 4


def _after_error(ctx: JobContext, phase: str, e: Exception) -> int:
    """Record what an exception means for the job: a clear error, or a retry. Returns the exit code;
    1 when the database cannot be reached (the worker then retries the phase once it is back)."""
    what = f"{type(e).__name__}: {e}"[:1500]
    try:
        if is_disk_full(e):
            # Saves are atomic (a temporary name, then a rename), so what was saved before stays good.
            message = (
                f"The {phase} step ran out of disk space while writing ({what}). Free some space "
                "(or raise the quota) and create the job again."
            )
        elif isinstance(e, OperationalError):
            return 1  # the database: not the job's fault; the worker retries once it is reachable
        elif phase == "train" and (n := queue.attempts(ctx.db, ctx.job_id)) < TRAIN_ERROR_ATTEMPTS:
            delay = queue.retry_delay(ctx.settings.job_retry_seconds, n)
            queue.release(
                ctx.db,
                worker_id=ctx.worker_id,
                job_id=ctx.job_id,
                message=f"Retrying in {delay:g} s: the training process failed with {what} (start {n}; the job fails at {TRAIN_ERROR_ATTEMPTS})",
                delay=delay,
            )
            return 0
        else:
            message = f"The {phase} step failed: {what}"
        failed = queue.fail(
            ctx.db, job_id=ctx.job_id, worker_id=ctx.worker_id, code="server_error", message=message
        )
        if failed and phase == "train":
            job = ctx.load()
            kind(job.kind).discard(ctx.settings, organization_id=job.organization_id, job_id=job.id)
    except OperationalError:
        log.exception("job %s: could not record the error", ctx.job_id)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
