"""Workers declare what they can run (the `workers` table) and claim only jobs they can run."""

from __future__ import annotations

import json
import time

from sqlalchemy import update
from typer.testing import CliRunner

from tests.conftest import TINY_MODEL
from tests.jobs.conftest import create_job, events, wait_until
from tunehouse.jobs import queue
from tunehouse.jobs.worker import Worker
from tunehouse.store.engine import Database
from tunehouse.store.tables import Job


def test_a_job_that_needs_a_gpu_waits_for_a_worker_that_has_one(api, tmp_path, tiny_model_dir):
    settings = api.settings
    # Every base model counts as big: the job needs one GPU. This worker offers none.
    settings.gpu_min_params = 1
    worker = Worker(settings, concurrency=1)
    assert worker.capabilities["gpus"] == 0 and worker.capabilities["executor"] == "local"
    worker.start()
    client = api.client()
    db = Database(settings.db_url)
    try:
        job = create_job(client, tmp_path)
        wait_until(
            lambda: client.fine_tuning.jobs.retrieve(job.id).status == "queued", timeout=120, what="queued"
        )
        waiting = wait_until(
            lambda: [e for e in events(client, job.id) if "needs a worker with 1 GPU" in e.message],
            timeout=30,
            what="the waiting event",
        )
        assert waiting[0].level == "warn"
        assert queue.gpus_required(db, job.id) == 1
        # Several rounds of the worker later, still nobody has claimed it.
        time.sleep(4 * settings.worker_poll_seconds)
        assert queue.job_state(db, job.id) == ("queued", None)
        # A worker offering a GPU would take it (the claim only; nothing trains here).
        assert queue.claim(db, worker_id="gpu-box", phase="train", lease_seconds=30, gpus=0) is None
        assert queue.claim(db, worker_id="gpu-box", phase="train", lease_seconds=30, gpus=1) == job.id
        client.fine_tuning.jobs.cancel(job.id)
    finally:
        worker.stop()
        db.dispose()


def test_gpus_are_derived_from_the_base_model_size(tiny_model_dir):
    # The tiny model has a few million parameters.
    assert queue.gpus_for(tiny_model_dir, options=None, gpu_min_params=3e9) == 0
    assert queue.gpus_for(tiny_model_dir, options=None, gpu_min_params=1e6) == 1
    assert queue.gpus_for(tiny_model_dir, options={"gpus": 2}, gpu_min_params=3e9) == 2


def test_workers_register_heartbeat_and_are_listed(settings, tmp_path):
    from tunehouse.api.state import AppState
    from tunehouse.cli.main import app

    state = AppState.open(settings)  # migrates the fresh database
    settings.worker_gpus = 2  # as `tunehouse worker --gpus 2` on a GPU box would say
    a = Worker(settings, db=state.db, concurrency=3)
    b = Worker(settings, db=state.db)
    a.start()
    b.start()
    try:
        alive = {w["id"]: w for w in queue.list_workers(state.db, alive_within=settings.lease_seconds)}
        assert set(alive) == {a.worker_id, b.worker_id}
        assert alive[a.worker_id]["concurrency"] == 3
        assert alive[a.worker_id]["capabilities"]["gpus"] == 2
        assert alive[a.worker_id]["capabilities"]["cpus"] >= 1
        first_beat = alive[a.worker_id]["last_heartbeat"]
        wait_until(
            lambda: queue.list_workers(state.db, alive_within=60)[0]["last_heartbeat"] > first_beat,
            timeout=30,
            what="a heartbeat",
        )
    finally:
        b.stop()
    try:
        env = {"TUNEHOUSE_HOME": str(settings.home)}
        if settings.database_url:
            env["TUNEHOUSE_DATABASE_URL"] = settings.database_url
        out = CliRunner().invoke(app, ["workers", "--json"], env=env)
        assert out.exit_code == 0, out.output
        assert [w["id"] for w in json.loads(out.output)] == [a.worker_id]  # b stopped
        out = CliRunner().invoke(app, ["workers", "--all", "--json"], env=env)
        states = {w["id"]: w["state"] for w in json.loads(out.output)}
        assert states == {a.worker_id: "alive", b.worker_id: "stopped"}
        out = CliRunner().invoke(app, ["workers"], env=env)
        assert "alive" in out.output and out.exit_code == 0
    finally:
        a.stop()
    # A worker that stops heartbeating (killed) shows as lost once its beats are old.
    with state.db.transaction() as s:
        from tunehouse.store.tables import Worker as WorkerRow

        s.execute(
            update(WorkerRow).where(WorkerRow.id == a.worker_id).values(stopped_at=None, last_heartbeat=0)
        )
    gone = {w["id"]: w["state"] for w in queue.list_workers(state.db, alive_within=60, include_gone=True)}
    assert gone[a.worker_id] == "lost"
    state.close()


def test_a_train_claim_skips_jobs_that_need_more_gpus(api, tmp_path):
    """Two queued jobs, the older one needs a GPU: a CPU worker takes the younger one."""
    client = api.client()
    db = Database(api.settings.db_url)
    try:
        big, small = create_job(client, tmp_path), create_job(client, tmp_path)
        with db.transaction() as s:
            s.execute(update(Job).where(Job.id.in_([big.id, small.id])).values(status="queued"))
            s.execute(update(Job).where(Job.id == big.id).values(gpus_required=1))
        assert queue.claim(db, worker_id="cpu", phase="train", lease_seconds=30, gpus=0) == small.id
        assert queue.claim(db, worker_id="cpu", phase="train", lease_seconds=30, gpus=0) is None
        assert queue.claim(db, worker_id="gpu", phase="train", lease_seconds=30, gpus=4) == big.id
        assert TINY_MODEL
    finally:
        db.dispose()
