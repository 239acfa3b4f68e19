"""A running job's estimated_finish: set from the planned time when training starts, then moved by
the pace of the steps done (JobHooks in jobs/fine_tuning.py), on a real database row."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import select, update

from tests.conftest import TINY_MODEL
from tunehouse.jobs.context import JobContext
from tunehouse.jobs.fine_tuning import JobHooks
from tunehouse.store.engine import Database, migrate
from tunehouse.store.tables import Job, Organization


def _eta(db: Database, job_id: str) -> int | None:
    with db.session() as s:
        return s.scalar(select(Job.estimated_finish).where(Job.id == job_id))


@pytest.mark.one_database
def test_estimated_finish_follows_the_steps(settings):
    settings.ensure_dirs()
    migrate(settings.db_url)
    db = Database(settings.db_url)
    job_id = "ftjob-estimate0000000000"
    with db.transaction() as s:
        s.add(Organization(id="org-est", name="Est", slug="est"))
        s.flush()
        s.add(
            Job(
                id=job_id,
                organization_id="org-est",
                model=TINY_MODEL,
                base_model=TINY_MODEL,
                training_file="file-x",
                seed=0,
                method={"type": "supervised"},
                status="running",
                worker_id="worker-1",
                estimated_tokens=1000,
            )
        )
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        hooks = JobHooks(
            JobContext(settings, job_id, "worker-1"), model_name="ft:x", base_model=TINY_MODEL, stored=None
        )
        hooks.planned_seconds = 600.0
        hooks.on_start(total_steps=10)
        now = time.time()
        assert abs(_eta(db, job_id) - (now + 600)) <= 2  # before any step: the planned time

        # One step took 10 s: 9 steps left at that pace.
        hooks._t0 = time.monotonic() - 10
        hooks.on_metrics(step=1, total_steps=10, metrics={"train_loss": 1.0})
        assert abs(_eta(db, job_id) - (time.time() + 90)) <= 2
        # Faster steps since: the estimate moves earlier.
        hooks._t0 = time.monotonic() - 16
        hooks.on_metrics(step=8, total_steps=10, metrics={"train_loss": 0.5})
        assert abs(_eta(db, job_id) - (time.time() + 4)) <= 2

        # A resumed run (from step 5 of 10) restarts the pace from there: half the plan is left.
        hooks.on_resume(step=5)
        assert abs(_eta(db, job_id) - (time.time() + 300)) <= 2

        # Another worker's job (or one no longer running) is never written.
        with db.transaction() as s:
            s.execute(update(Job).where(Job.id == job_id).values(status="paused", estimated_finish=1))
        hooks.on_metrics(step=6, total_steps=10, metrics={"train_loss": 0.4})
        assert _eta(db, job_id) == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        db.dispose()
