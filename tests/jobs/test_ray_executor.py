"""The Ray executor: a `tunehouse worker --executor ray` submits training to a Ray head started
here (one CPU), and the job behaves as with the local executor: events, checkpoints, a model that
answers, pause and resume, cancel. Skipped when the `ray` extra is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.api.conftest import free_port
from tests.jobs.conftest import LINES, create_job, events, metric_steps, wait_until

pytest.importorskip("ray")


@pytest.fixture
def ray_head(tmp_path):
    yield from _ray_head(num_cpus=1)


def _ray_head(*, num_cpus: int):
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    # A head of our own (its own temp dir), stopped by killing its process group: never `ray stop`,
    # which would stop every Ray on the machine.
    temp_dir = Path("/tmp") / f"ray-th-{os.getpid()}-{port}"  # Ray wants a short socket path
    head = subprocess.Popen(
        [
            str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--disable-usage-stats", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            # `ray start --block` takes ~30 s to shut down gracefully; a test cluster need not.
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _worker(settings, address: str, log: Path, **extra_env: str) -> subprocess.Popen:
    env = {
        **extra_env,
        **os.environ,
        "TUNEHOUSE_HOME": str(settings.home),
        "TUNEHOUSE_MODELS_DIR": str(settings.base_models_dir),
        "TUNEHOUSE_BASE_MODELS": json.dumps({k: str(v) for k, v in settings.base_models.items()}),
        "TUNEHOUSE_EXECUTOR": "ray",
        "TUNEHOUSE_RAY_ADDRESS": address,
        "TUNEHOUSE_STATE_SAVE_SECONDS": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    if settings.database_url:
        env["TUNEHOUSE_DATABASE_URL"] = settings.database_url
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tunehouse", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def test_a_job_trains_through_ray_as_it_does_locally(api, ray_head, tmp_path):
    client = api.client()
    log = tmp_path / "worker.log"
    worker = _worker(api.settings, ray_head, log)
    try:
        # 1. A job trains to the end: metrics, a checkpoint, a model that answers.
        job = create_job(client, tmp_path, lines=LINES[:10], n_epochs=2)
        done = wait_until(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            timeout=300,
            what=f"the job to finish (worker log: {log})",
        )
        assert done.status == "succeeded", (done.error, log.read_text()[-3000:])
        assert metric_steps(client, job.id) == list(range(1, 21))
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) == 2
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "Count to 3"}], max_tokens=4
        )
        assert reply.choices[0].message is not None
        from tunehouse.jobs.queue import list_workers
        from tunehouse.store.engine import Database

        db = Database(api.settings.db_url)
        (w,) = list_workers(db, alive_within=60)
        db.dispose()
        assert w["capabilities"]["executor"] == "ray" and w["capabilities"]["cpus"] == 1

        # 2. Pause, resume, cancel: the Ray task stops and the run continues from its state.
        job = create_job(client, tmp_path, n_epochs=3)
        wait_until(lambda: len(metric_steps(client, job.id)) >= 3, timeout=240, what="training to start")
        client.fine_tuning.jobs.pause(job.id)
        wait_until(
            lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", timeout=60, what="paused"
        )
        paused_at = _settled(client, job.id)
        client.fine_tuning.jobs.resume(job.id)
        wait_until(
            lambda: any(
                e.message.startswith("Fine-tuning job resumed from step") for e in events(client, job.id)
            ),
            timeout=240,
            what="the resume",
        )
        wait_until(lambda: len(metric_steps(client, job.id)) > paused_at, timeout=240, what="progress")
        client.fine_tuning.jobs.cancel(job.id)
        steps = _settled(client, job.id)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
        assert metric_steps(client, job.id) == list(range(1, steps + 1))  # none twice, none lost
        # The cancelled job's runner is gone: no process trains it any more.
        wait_until(
            lambda: not subprocess.run(["pgrep", "-f", f"runner train {job.id}"], capture_output=True).stdout,
            timeout=60,
            what="the runner to exit",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _settled(client, job_id) -> int:
    n = -1
    while True:
        now = len(metric_steps(client, job_id))
        if now == n:
            return n
        n = now
        time.sleep(3)


def _stop(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _losses(client, job_id) -> list[tuple[int, float]]:
    return sorted(
        (e.data["step"], e.data["train_loss"]) for e in events(client, job_id) if e.type == "metrics"
    )


@pytest.mark.one_database  # the loss curves of 1 and 2 workers; the one-worker test runs on both
def test_two_ray_train_workers_train_a_job_as_one_process_does(api, tmp_path):
    """TUNEHOUSE_RAY_TRAIN_WORKERS=2: two data-parallel runners (gloo, CPU) under Ray Train's
    TorchTrainer split every step and sum their gradients: the same steps and the same loss curve
    as the job trained by one local process."""
    from tunehouse.jobs.worker import Worker

    settings, client = api.settings, api.client()
    settings.dtype = "float32"  # bf16 would round the two runs differently; the sums are the same
    hyper = {"n_epochs": 2, "batch_size": 2}  # 10 steps; each worker takes one example of each

    local = Worker(settings)
    local.start()
    try:
        reference = create_job(client, tmp_path, lines=LINES[:10], **hyper)
        wait_until(
            lambda: client.fine_tuning.jobs.retrieve(reference.id).status in ("succeeded", "failed"),
            timeout=300,
            what="the single-process job",
        )
    finally:
        local.stop()
    assert client.fine_tuning.jobs.retrieve(reference.id).status == "succeeded"

    head = _ray_head(num_cpus=2)  # one CPU per Ray Train worker
    address = next(head)
    log = tmp_path / "worker.log"
    worker = _worker(settings, address, log, TUNEHOUSE_RAY_TRAIN_WORKERS="2", TUNEHOUSE_DTYPE="float32")
    try:
        job = create_job(client, tmp_path, lines=LINES[:10], **hyper)
        done = wait_until(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            timeout=420,
            what=f"the data-parallel job (worker log: {log})",
        )
        train_log = settings.jobs_dir / job.id / "train.log"
        assert done.status == "succeeded", (
            done.error,
            train_log.read_text()[-3000:] if train_log.exists() else "",
        )
        # Two processes trained it: rank 1 logged its share; rank 0 alone recorded the job.
        assert "data parallel: worker 1 of 2" in Path(f"{train_log}.rank1").read_text()
        assert "data parallel: worker 0 of 2" in train_log.read_text()
        assert metric_steps(client, job.id) == list(range(1, 11))
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) == 2
        ours, theirs = _losses(client, job.id), _losses(client, reference.id)
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        for (step, a), (_, b) in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4), f"step {step}: {a} vs {b}"
        assert ours[-1][1] < ours[0][1]  # and it learned

        # Pause and resume: rank 0 sees the pause, all ranks stop at the same step, and the next
        # run's ranks continue from the state rank 0 saved: every step once.
        # 80 steps of one example (rank 1's share is empty: it adds zero gradients), long enough
        # for the pause to land mid-run.
        job = create_job(client, tmp_path, lines=LINES, n_epochs=4, batch_size=1)
        wait_until(lambda: len(metric_steps(client, job.id)) >= 2, timeout=300, what="training to start")
        client.fine_tuning.jobs.pause(job.id)
        wait_until(
            lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", timeout=60, what="paused"
        )
        paused_at = _settled(client, job.id)
        assert paused_at < 80, "the job finished before it could be paused"
        client.fine_tuning.jobs.resume(job.id)
        done = wait_until(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            timeout=420,
            what="the resumed data-parallel job",
        )
        assert done.status == "succeeded", done.error
        assert metric_steps(client, job.id) == list(range(1, 81))
        assert any(e.message.startswith("Fine-tuning job resumed from step") for e in events(client, job.id))
    finally:
        _stop(worker)
        head.close()
