"""The jobs table is the queue. A worker claims a job atomically and holds a lease on it that it
renews by heartbeat; a job whose lease ran out (its worker died) can be claimed again."""

from __future__ import annotations

import time

from sqlalchemy import and_, case, or_, select, update

from tunehouse.jobs import status as st
from tunehouse.jobs.events import add_event
from tunehouse.store.engine import Database
from tunehouse.store.tables import Job
from tunehouse.store.tables import Worker as WorkerRow
from tunehouse.store.tables import now as now_s
from tunehouse.webhooks.outbox import JOB_FAILED, enqueue_job_event


def _unleased(now: float):
    return or_(Job.worker_id.is_(None), Job.lease_expires_at < now)


def _due(now: float):
    """Not waiting out a retry backoff (see `release`)."""
    return or_(Job.retry_at.is_(None), Job.retry_at <= now)


MAX_RETRY_DELAY_SECONDS = 300.0


def retry_delay(base_seconds: float, attempts: int) -> float:
    """How long a job waits before its next start after a failed one: base × 2^(n-1) for the n-th
    retry (validation counts as the first start), at most 5 minutes."""
    n = max(attempts - 1, 1)
    return min(base_seconds * 2 ** (n - 1), MAX_RETRY_DELAY_SECONDS)


def claim(
    db: Database, *, worker_id: str, phase: str, lease_seconds: float, gpus: int | None = None
) -> str | None:
    """Claim the oldest job ready for `phase` ("validate" or "train") that this worker can run:
    a train phase needs a worker offering at least the job's `gpus_required` (`gpus`; None: any).

    Returns the job id; a running job taken over from a dead worker gets an event saying so.
    The conditional UPDATE makes the claim atomic on SQLite; PostgreSQL also skips rows another
    worker has locked (FOR UPDATE SKIP LOCKED) instead of waiting on them.
    """
    now = time.time()
    if phase == "validate":
        ready = and_(Job.status == st.VALIDATING, _unleased(now), _due(now))
    else:
        ready = or_(
            and_(Job.status == st.QUEUED, _unleased(now), _due(now)),
            and_(Job.status == st.RUNNING, Job.lease_expires_at < now),
        )
        if gpus is not None:
            ready = and_(ready, Job.gpus_required <= gpus)
    with db.transaction() as s:
        pick = select(Job.seq, Job.status).where(ready).order_by(Job.seq).limit(1)
        if db.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        row = s.execute(pick).first()
        if row is None:
            return None
        new_status = st.VALIDATING if phase == "validate" else st.RUNNING
        claimed = s.execute(
            update(Job)
            .where(Job.seq == row.seq, ready)
            .values(
                status=new_status,
                worker_id=worker_id,
                lease_expires_at=now + lease_seconds,
                # Every start counts: a job whose process keeps dying is failed, not retried forever.
                attempts=Job.attempts + 1,
                retry_at=None,
            )
            .returning(Job.id)
        ).scalar()
        if claimed is None:
            return None
        if row.status == st.RUNNING:
            add_event(
                s,
                claimed,
                "The worker running this job stopped; the job is starting again on another worker",
                level="warn",
            )
        return claimed


def renew(db: Database, *, worker_id: str, job_ids: list[str], lease_seconds: float) -> None:
    if not job_ids:
        return
    with db.transaction() as s:
        s.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.worker_id == worker_id)
            .values(lease_expires_at=time.time() + lease_seconds)
        )


def job_state(db: Database, job_id: str) -> tuple[str, str | None] | None:
    with db.session() as s:
        row = s.execute(select(Job.status, Job.worker_id).where(Job.id == job_id)).first()
        return (row.status, row.worker_id) if row else None


def kind_of(db: Database, job_id: str) -> str | None:
    """The job's kind (jobs/kinds.py), or None when the job is gone."""
    with db.session() as s:
        return s.scalar(select(Job.kind).where(Job.id == job_id))


def organization_of(db: Database, job_id: str) -> str | None:
    with db.session() as s:
        return s.scalar(select(Job.organization_id).where(Job.id == job_id))


def gpus_for(base_model_path, *, options: dict | None, gpu_min_params: float) -> int:
    """The GPUs a job needs: the job's own `gpus` option when it has one; else 1 for a base model
    of at least `gpu_min_params` parameters (counted from its safetensors headers, without
    loading it), else 0 (a CPU worker can train it)."""
    import json
    import struct
    from pathlib import Path

    if options and options.get("gpus") is not None:
        return int(options["gpus"])
    n_params = 0
    for f in Path(base_model_path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                n_params += count
    return 1 if n_params >= gpu_min_params else 0


def gpus_required(db: Database, job_id: str) -> int:
    with db.session() as s:
        return s.scalar(select(Job.gpus_required).where(Job.id == job_id)) or 0


def attempts(db: Database, job_id: str) -> int:
    with db.session() as s:
        return s.scalar(select(Job.attempts).where(Job.id == job_id)) or 0


def release(db: Database, *, worker_id: str, job_id: str, message: str, delay: float = 0.0) -> None:
    """Hand a job back to the queue: it runs again on the next free worker, not before `delay`
    seconds (a retry after a failure backs off; a graceful shutdown hands it back at once)."""
    with db.transaction() as s:
        n = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_((st.RUNNING, st.VALIDATING)))
            .values(
                status=case((Job.status == st.RUNNING, st.QUEUED), else_=Job.status),
                worker_id=None,
                lease_expires_at=None,
                retry_at=time.time() + delay if delay > 0 else None,
            )
        ).rowcount
        if n:
            add_event(s, job_id, message, level="warn")


def fail(
    db: Database, *, job_id: str, worker_id: str | None, code: str, message: str, param: str | None = None
) -> bool:
    """Mark an active job failed (only if it is still ours and still active)."""
    with db.transaction() as s:
        cond = [Job.id == job_id, Job.status.in_((st.VALIDATING, st.QUEUED, st.RUNNING))]
        if worker_id is not None:
            cond.append(Job.worker_id == worker_id)
        n = s.execute(
            update(Job)
            .where(*cond)
            .values(
                status=st.FAILED,
                finished_at=now_s(),
                worker_id=None,
                lease_expires_at=None,
                error={"code": code, "message": message, "param": param},
            )
        ).rowcount
        if n:
            add_event(s, job_id, f"Fine-tuning job failed: {message}", level="error")
            # In the transaction that made the job failed, so the webhook goes out exactly once.
            enqueue_job_event(s, job_id=job_id, event_type=JOB_FAILED)
        return bool(n)


# --- the workers table: who is there, what each can run ------------------------------------------
def register_worker(db: Database, *, worker_id: str, host: str, capabilities: dict, concurrency: int) -> None:
    with db.transaction() as s:
        s.add(
            WorkerRow(
                id=worker_id,
                host=host,
                capabilities=capabilities,
                concurrency=concurrency,
                last_heartbeat=time.time(),
            )
        )


def worker_heartbeat(db: Database, *, worker_id: str) -> None:
    with db.transaction() as s:
        s.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(last_heartbeat=time.time()))


def worker_stopped(db: Database, *, worker_id: str) -> None:
    with db.transaction() as s:
        s.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(stopped_at=now_s()))


def list_workers(db: Database, *, alive_within: float, include_gone: bool = False) -> list[dict]:
    """Workers with their state: "alive" (heartbeat within `alive_within` seconds), "stopped"
    (stopped gracefully) or "lost" (no heartbeat: killed, or its machine went away); and the jobs
    each holds now."""
    cutoff = time.time() - alive_within
    with db.session() as s:
        rows = s.scalars(select(WorkerRow).order_by(WorkerRow.seq)).all()
        held: dict[str, list[str]] = {}
        for job_id, wid in s.execute(
            select(Job.id, Job.worker_id).where(
                Job.worker_id.is_not(None), Job.lease_expires_at >= time.time()
            )
        ):
            held.setdefault(wid, []).append(job_id)
    out = []
    for r in rows:
        state = "stopped" if r.stopped_at else ("alive" if r.last_heartbeat >= cutoff else "lost")
        if state != "alive" and not include_gone:
            continue
        out.append(
            {
                "id": r.id,
                "host": r.host,
                "state": state,
                "capabilities": r.capabilities,
                "concurrency": r.concurrency,
                "started_at": r.started_at,
                "last_heartbeat": r.last_heartbeat,
                "jobs": held.get(r.id, []),
            }
        )
    return out


def max_gpus_offered(db: Database, *, alive_within: float) -> int | None:
    """The most GPUs any live worker offers (None: no live worker is registered)."""
    workers = list_workers(db, alive_within=alive_within)
    if not workers:
        return None
    return max(int(w["capabilities"].get("gpus", 0)) for w in workers)
