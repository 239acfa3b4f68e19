"""Files and weights in a non-local fsspec store: uploads stream into it, the training process
(another process) reads the files and publishes checkpoints into it, and inference reads the
weights back through the local cache. The store is fsspec's `dir` filesystem over a folder outside
the home: not a LocalFileSystem, so every read and write takes the remote-storage path, yet
shared across processes (memory:// is not)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys

from tests.api.conftest import LiveServer, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL
from tests.jobs.conftest import LINES, create_job, events, metric_steps, wait_until
from tunehouse.jobs import queue
from tunehouse.jobs.state_store import STATE_AREA
from tunehouse.jobs.worker import child_env
from tunehouse.store.blobs import COMPLETE_MARKER, Blobs, open_blobs
from tunehouse.store.engine import Database


def test_a_job_trains_and_serves_from_remote_storage(settings, tmp_path):
    shared = tmp_path / "object-store"
    shared.mkdir()
    settings.storage_url = "dir://"
    settings.storage_options = {"path": str(shared), "target_protocol": "file"}
    assert type(open_blobs(settings, "files")) is Blobs  # the remote code path, not LocalBlobs

    with LiveServer(settings) as live:
        client = live.client()
        data = write_jsonl(tmp_path / "t.jsonl", LINES[:10])
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        stored = list((shared / "files").rglob(f.id))
        assert len(stored) == 1 and stored[0].read_bytes() == data.read_bytes()
        assert not list((shared / "files").rglob("*.partial-*"))
        assert not (settings.home / "files").exists() or not list((settings.home / "files").rglob(f.id))
        assert client.files.content(f.id).content == data.read_bytes()

        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=f.id,
            seed=1,
            hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2},
        )
        done = wait_for_job(client, job.id, timeout=300)
        assert done.status == "succeeded", done.error

        # Both epoch checkpoints were published whole into the store, marker last.
        published = sorted(p.parent.name for p in (shared / "weights").rglob(COMPLETE_MARKER))
        assert published == ["step-10", "step-5"]
        for marker in (shared / "weights").rglob(COMPLETE_MARKER):
            assert (marker.parent / "adapter_model.safetensors").is_file()
        # The result file too.
        (result_id,) = done.result_files
        assert base64.b64decode(client.files.content(result_id).read()).decode().startswith("step,")

        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "Count to 2"}], max_tokens=3
        )
        assert reply.choices[0].message is not None
        # Inference loaded the adapter from the local cache, keyed by its path in the store.
        cached = list((settings.home / "cache" / "blobs" / "weights").rglob("adapter_model.safetensors"))
        assert cached

        client.models.delete(done.fine_tuned_model)
        assert [p.parent.name for p in (shared / "weights").rglob(COMPLETE_MARKER)] == ["step-5"]


def _stored_steps(shared, job_id) -> list[int]:
    """Steps of the complete training states stored for a job (marker present)."""
    return sorted(
        int(marker.parent.name.split("-")[0])
        for marker in (shared / STATE_AREA).glob(f"*/{job_id}/*/{COMPLETE_MARKER}")
    )


def test_a_job_taken_over_on_another_machine_resumes_from_the_stored_state(settings, tmp_path):
    """Machine A trains and is killed with -9; machine B (its own home: no local state, no cache,
    only the shared database and storage) takes the job over and resumes from the state A stored."""
    shared = tmp_path / "object-store"
    shared.mkdir()
    settings.storage_url = "dir://"
    settings.storage_options = {"path": str(shared), "target_protocol": "file"}
    settings.state_save_seconds = 0  # a state after every step
    settings.local_worker = False  # this test plays the workers
    machine_b = settings.model_copy(update={"home": tmp_path / "machine-b", "database_url": settings.db_url})

    with LiveServer(settings) as live:
        client, db = live.client(), Database(settings.db_url)
        try:
            job = create_job(client, tmp_path, lines=LINES, n_epochs=3)  # 60 steps
            assert queue.claim(db, worker_id="a", phase="validate", lease_seconds=300) == job.id
            run_phase(settings, "validate", job.id, "a")
            # A short lease, never renewed here: once A is dead, B may claim the job at once.
            assert queue.claim(db, worker_id="a", phase="train", lease_seconds=1) == job.id
            a = subprocess.Popen(
                [sys.executable, "-m", "tunehouse.jobs.runner", "train", job.id, "a"],
                env=child_env(settings),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(lambda: any(s >= 3 for s in _stored_steps(shared, job.id)), timeout=240,
                           what="a training state stored")  # fmt: skip
                assert a.poll() is None, "machine A finished before it could be killed"
            finally:
                a.kill()
                a.wait()
            killed_at = max(_stored_steps(shared, job.id))
            # Machine A's disk is gone with it.
            shutil.rmtree(settings.jobs_dir / job.id / "state")

            wait_until(
                lambda: queue.claim(db, worker_id="b", phase="train", lease_seconds=300) == job.id,
                timeout=30,
                what="machine B to take the job over",
            )
            out = run_phase(machine_b, "train", job.id, "b")
            done = client.fine_tuning.jobs.retrieve(job.id)
            assert done.status == "succeeded", (done.error, out.stdout[-3000:])
            assert metric_steps(client, job.id) == list(range(1, 61))  # each step exactly once
            resumed = [e.message for e in events(client, job.id) if "resumed from step" in e.message]
            assert len(resumed) == 1
            assert int(resumed[0].rsplit(" ", 1)[1]) == killed_at > 0
            # B fetched the state from storage (it had none of its own) and trained from there.
            assert "fetched from storage" in out.stdout + out.stderr
            # The job ended: its stored and local states are gone.
            assert not list((shared / STATE_AREA).rglob(f"*{job.id}*"))
            assert not (machine_b.jobs_dir / job.id / "state").exists()
            assert client.fine_tuning.jobs.checkpoints.list(job.id).data
        finally:
            db.dispose()


def run_phase(settings, phase, job_id, worker_id):
    out = subprocess.run(
        [sys.executable, "-m", "tunehouse.jobs.runner", phase, job_id, worker_id],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out
