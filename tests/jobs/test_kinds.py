"""Job kinds: every job row has one, and the runner dispatches a phase on it (jobs/kinds.py)."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import select, update

from tests.jobs.conftest import create_job
from tests.jobs.test_faults import _run_phase
from tunehouse.jobs import queue
from tunehouse.jobs.batch import BatchKind
from tunehouse.jobs.eval_run import EvalRunKind
from tunehouse.jobs.fine_tuning import FineTuning
from tunehouse.jobs.kinds import KINDS, kind
from tunehouse.store.engine import Database
from tunehouse.store.tables import Job


def test_the_kinds_table() -> None:
    assert set(KINDS) == {"fine_tuning", "eval_run", "batch"}
    assert isinstance(kind("fine_tuning"), FineTuning)
    assert isinstance(kind("eval_run"), EvalRunKind)
    assert isinstance(kind("batch"), BatchKind)
    assert isinstance(kind(None), FineTuning)  # a row from before kinds existed
    with pytest.raises(ValueError, match="unknown job kind 'embedding'"):
        kind("embedding")


def test_a_job_of_a_kind_this_server_does_not_run_fails_clearly(api, tmp_path) -> None:
    client = api.client()
    db = Database(api.settings.db_url)
    try:
        job = create_job(client, tmp_path)
        with db.session() as s:
            assert s.scalar(select(Job.kind).where(Job.id == job.id)) == "fine_tuning"
        with db.transaction() as s:
            s.execute(update(Job).where(Job.id == job.id).values(kind="embedding"))
        # The fine-tuning endpoints show fine-tuning jobs only.
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve(job.id)
        assert job.id not in [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
        assert queue.claim(db, worker_id="w", phase="validate", lease_seconds=300) == job.id
        out = _run_phase(api.settings, "validate", job.id, "w")
        assert out.returncode == 0, out.stderr[-2000:]
        with db.session() as s:  # read from the table: the fine-tuning API lists fine-tuning jobs only
            failed = s.scalar(select(Job).where(Job.id == job.id))
        assert failed.status == "failed"
        assert failed.error["code"] == "server_error"
        assert "unknown job kind 'embedding'" in failed.error["message"]
    finally:
        db.dispose()
