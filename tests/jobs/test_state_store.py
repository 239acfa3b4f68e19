"""Training state through the storage URL (jobs/state_store.py): versions published whole, the
previous one kept until the next is complete, the newest complete one fetched only when it is
past the local state, nothing copied when storage is the home."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from tests.api.conftest import LiveServer
from tests.jobs.conftest import create_job
from tunehouse.config import Settings
from tunehouse.jobs import queue
from tunehouse.jobs.state_store import (
    STATE_AREA,
    StoredState,
    storage_is_home,
    stored_state,
    sweep_ended_jobs,
)
from tunehouse.store.blobs import COMPLETE_MARKER, Blobs, LocalBlobs
from tunehouse.store.engine import Database
from tunehouse.training.state import STATE_INFO, STATE_VERSION, read_state_info


@pytest.fixture(params=["memory", "local"])
def blobs(request, tmp_path: Path):
    if request.param == "local":  # a shared mount: file:// storage outside the home
        yield LocalBlobs(tmp_path / "mount" / STATE_AREA)
        return
    fs = fsspec.filesystem("memory")
    root = f"/state-test-{uuid.uuid4().hex[:8]}"
    yield Blobs(fs, root, cache_dir=tmp_path / "cache")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _state(folder: Path, step: int) -> Path:
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "weights.bin").write_bytes(bytes([step]) * 100)
    (folder / STATE_INFO).write_text(json.dumps({"version": STATE_VERSION, "step": step}))
    return folder


def test_each_save_replaces_the_previous_only_once_complete(blobs, tmp_path):
    stored = StoredState(blobs, organization_id="org-1", job_id="ftjob-1")
    first = stored.publish(_state(tmp_path / "s3", 3), step=3)
    assert [s for s, _ in stored.versions()] == [3]
    # An upload cut short (no marker): never trusted, and cleared by the next publish.
    partial = f"{stored.prefix}/{9:010d}-deadbeef"
    if isinstance(blobs, LocalBlobs):
        partial = f"{stored.prefix}/.{9:010d}-deadbeef.x.partial"  # LocalBlobs' own temp name
    blobs.write_bytes(f"{partial}/state.json", b"{}")
    assert [s for s, _ in stored.versions()] == [3]
    second = stored.publish(_state(tmp_path / "s5", 5), step=5)
    assert [k for _, k in stored.versions()] == [second] != [first]
    assert blobs.children(stored.prefix) == [second.rsplit("/", 1)[1]]

    # A machine with no state of its own takes the newest; the marker is not part of the state.
    here = tmp_path / "machine-b" / "state"
    assert stored.fetch_newer(here) == 5
    assert read_state_info(here)["step"] == 5
    assert (here / "adapter" / "weights.bin").read_bytes() == bytes([5]) * 100
    assert not (here / COMPLETE_MARKER).exists()
    assert [p.name for p in here.parent.iterdir()] == ["state"]  # no temporary folder left

    # A local state as new or newer stays; an older one is replaced.
    _state(here, 7)
    assert stored.fetch_newer(here) is None and read_state_info(here)["step"] == 7
    _state(here, 4)
    assert stored.fetch_newer(here) == 5 and read_state_info(here)["step"] == 5

    stored.delete()
    assert stored.versions() == [] and blobs.children(stored.prefix) == []
    assert stored.fetch_newer(tmp_path / "machine-c" / "state") is None


def test_nothing_is_copied_when_storage_is_the_home(tmp_path):
    home = tmp_path / "home"
    assert storage_is_home(Settings(home=home))
    assert storage_is_home(Settings(home=home, storage_url=f"file://{home}"))
    assert stored_state(Settings(home=home), organization_id="o", job_id="j") is None
    assert not storage_is_home(Settings(home=home, storage_url=f"file://{tmp_path / 'nfs'}"))
    remote = Settings(
        home=home, storage_url="dir://", storage_options={"path": str(tmp_path), "target_protocol": "file"}
    )
    assert type(stored_state(remote, organization_id="o", job_id="j").blobs) is Blobs


def test_states_of_jobs_that_ended_without_a_training_process_are_swept(settings, tmp_path):
    settings.storage_url = "dir://"
    settings.storage_options = {"path": str(tmp_path / "store"), "target_protocol": "file"}
    settings.local_worker = False
    with LiveServer(settings) as live:
        client, db = live.client(), Database(settings.db_url)
        try:
            ended, waiting = create_job(client, tmp_path), create_job(client, tmp_path)
            client.fine_tuning.jobs.cancel(ended.id)  # never trained here: nothing cleaned up after it
            org = queue.organization_of(db, ended.id)
            for job_id in (ended.id, waiting.id):
                _state(settings.jobs_dir / job_id / "state", 2)
                stored_state(settings, organization_id=org, job_id=job_id).publish(
                    settings.jobs_dir / job_id / "state", step=2
                )
            assert sweep_ended_jobs(settings, db) == 1
            assert not (settings.jobs_dir / ended.id / "state").exists()
            assert stored_state(settings, organization_id=org, job_id=ended.id).versions() == []
            assert (settings.jobs_dir / waiting.id / "state").is_dir()
            assert [
                s for s, _ in stored_state(settings, organization_id=org, job_id=waiting.id).versions()
            ] == [2]
            assert sweep_ended_jobs(settings, db) == 0
        finally:
            db.dispose()
