"""Training state through the storage URL, so that a job taken over by a worker on another machine
resumes from its last saved state instead of starting over.

The training recipes save their state atomically into a local folder, `<home>/jobs/<job>/state`.
When storage is not that home (`TUNEHOUSE_STORAGE_URL` names an object store or a shared mount),
the runner also publishes every local save to `<storage>/state/<org>/<job>/<version>/`, one
folder per save, named `<step, 10 digits>-<random>` so that names sort by step:

- a version is uploaded under a name of its own, its `.tunehouse-complete` marker last
  (Blobs.put_dir); a reader trusts only a version whose marker exists;
- the older versions are deleted only once the new one is complete, so a complete state is always
  there, whenever the upload is interrupted;
- a train phase that starts takes the newest complete version if it is past the local state's
  step (no local state: another machine; an older one: the job ran elsewhere since), swaps it into
  the local folder atomically, and the recipe resumes from it as usual.

With the default storage (the home itself) nothing is copied: the local folder is the state.
The stored state is deleted when the job ends (succeeded, failed, cancelled), like the local one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import select

from tunehouse.jobs import status as st
from tunehouse.store.blobs import COMPLETE_MARKER, Blobs, LocalBlobs, open_blobs
from tunehouse.store.tables import Job
from tunehouse.training.state import fsync_path, publish_dir, read_state_info, recover_state_dir

log = logging.getLogger(__name__)

STATE_AREA = "state"  # <storage>/state/<org>/<job>/<version>/


def storage_is_home(settings) -> bool:
    """True when storage is this machine's home folder: then the local state is all there is."""
    if settings.storage_url is None:
        return True
    blobs = open_blobs(settings, STATE_AREA)
    return isinstance(blobs, LocalBlobs) and (
        blobs.root_path.resolve() == (Path(settings.home) / STATE_AREA).resolve()
    )


class StoredState:
    """The saved training states of one job in the store."""

    def __init__(self, blobs: Blobs, *, organization_id: str, job_id: str):
        self.blobs = blobs
        self.prefix = f"{organization_id}/{job_id}"

    def versions(self) -> list[tuple[int, str]]:
        """(step, key) of the complete versions, oldest first."""
        found = []
        for name in self.blobs.children(self.prefix):
            step, _, _ = name.partition("-")
            key = f"{self.prefix}/{name}"
            if step.isdigit() and self.blobs.exists(key):
                found.append((int(step), key))
        return found

    def publish(self, local_dir: Path, *, step: int) -> str:
        """Upload the local state folder as a new version, then drop the others (older ones, and
        what an interrupted upload left). Returns the new version's key."""
        key = f"{self.prefix}/{step:010d}-{uuid.uuid4().hex[:8]}"
        self.blobs.put_dir(Path(local_dir), key)
        for name in self.blobs.children(self.prefix):
            if f"{self.prefix}/{name}" != key:
                self.blobs.delete(f"{self.prefix}/{name}")
        return key

    def fetch_newer(self, state_dir: Path) -> int | None:
        """Put the newest stored state in `state_dir` if it is past the local one's step. Returns
        that step, or None when the local state (or none at all) stays."""
        state_dir = Path(state_dir)
        recover_state_dir(state_dir)  # an interrupted local save first goes back to what it was
        try:
            info = read_state_info(state_dir)
        except (OSError, ValueError):  # unreadable here: the stored one is better than none
            info = None
        local_step = info["step"] if info else None
        versions = self.versions()
        if not versions or (local_step is not None and versions[-1][0] <= local_step):
            return None
        step, key = versions[-1]
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        # Named like the recipe's own temporary folders, so recover_state_dir clears a leftover.
        tmp = Path(tempfile.mkdtemp(prefix=f"{state_dir.name}.tmp-", dir=state_dir.parent))
        try:
            if not self.blobs.get_dir(key, tmp):
                return None  # replaced meanwhile (cannot happen while we own the job): start as is
            (tmp / COMPLETE_MARKER).unlink(missing_ok=True)
            for folder, _, files in os.walk(tmp):
                for name in files:
                    fsync_path(Path(folder) / name)
            publish_dir(tmp, state_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # or the local state it replaced
        log.info("training state at step %d fetched from storage (%s) into %s", step, key, state_dir)
        return step

    def delete(self) -> None:
        self.blobs.delete(self.prefix)


def stored_state(settings, *, organization_id: str, job_id: str) -> StoredState | None:
    """The job's states in the store; None when storage is the home (nothing to copy)."""
    if storage_is_home(settings):
        return None
    return StoredState(open_blobs(settings, STATE_AREA), organization_id=organization_id, job_id=job_id)


def discard_training_state(settings, *, organization_id: str, job_id: str) -> None:
    """A job that ended: its saved training state, here and in the store, is of no more use (and
    holds tokenized training data)."""
    shutil.rmtree(Path(settings.jobs_dir) / job_id / "state", ignore_errors=True)
    try:
        stored = stored_state(settings, organization_id=organization_id, job_id=job_id)
        if stored is not None:
            stored.delete()
    except Exception:  # cleanup only: the job's outcome is recorded already
        log.warning("job %s: could not delete its training state from storage", job_id, exc_info=True)


def sweep_ended_jobs(settings, db) -> int:
    """Delete the training states (here and in the store) of jobs that ended without a training
    process to clean up after them: cancelled while queued or paused, or deleted. Returns how
    many jobs' states went. Workers run it now and then; it is idempotent."""
    found: dict[str, str | None] = {}  # job id -> its organization's folder in the store
    jobs_dir = Path(settings.jobs_dir)
    if jobs_dir.is_dir():
        found.update((d.name, None) for d in jobs_dir.iterdir() if (d / "state").is_dir())
    blobs = None if storage_is_home(settings) else open_blobs(settings, STATE_AREA)
    if blobs is not None:
        for org in blobs.children(""):
            found.update((job_id, org) for job_id in blobs.children(org))
    if not found:
        return 0
    with db.session() as s:
        live = set(s.scalars(select(Job.id).where(Job.id.in_(found), Job.status.notin_(st.TERMINAL))))
    swept = 0
    for job_id, org in found.items():
        if job_id in live:
            continue
        shutil.rmtree(jobs_dir / job_id / "state", ignore_errors=True)
        if blobs is not None and org is not None:
            blobs.delete(f"{org}/{job_id}")
        swept += 1
    return swept
