"""What one phase of one job runs with, whatever the job's kind: the settings, the database, the
stores, the job's work folder, and the conditional updates that keep a job we no longer own safe.

Every state change a phase makes is a conditional update (the job must still be ours and still in
the phase we expect), so a job cancelled or taken over meanwhile is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select

from tunehouse.config import Settings
from tunehouse.jobs import queue
from tunehouse.jobs import status as st
from tunehouse.store.blobs import open_blobs
from tunehouse.store.engine import Database
from tunehouse.store.tables import File, Job

# Set by the launcher of a data-parallel train phase (executors/ray.py) for each of its runners.
DP_RANK = "TUNEHOUSE_DP_RANK"
DP_WORLD_SIZE = "TUNEHOUSE_DP_WORLD_SIZE"
DP_LOCAL_RANK = "TUNEHOUSE_DP_LOCAL_RANK"  # which of the node's GPUs
DP_MASTER = "TUNEHOUSE_DP_MASTER"  # host:port where rank 0 meets the others


class JobGone(Exception):
    """The job was cancelled, failed elsewhere, or taken over by another worker."""


class FileProblem(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


class JobContext:
    def __init__(self, settings: Settings, job_id: str, worker_id: str):
        self.settings = settings
        self.db = Database(settings.db_url)
        self.job_id = job_id
        self.worker_id = worker_id
        self.files = open_blobs(settings, "files")
        self.weights = open_blobs(settings, "weights")
        self.work_dir = settings.jobs_dir / job_id
        # One of several data-parallel processes (Ray Train, executors/ray.py): the launcher says
        # which (variables of our own: a stray RANK or WORLD_SIZE in a server's environment must
        # not make a lone runner wait for peers). Rank 0 records everything.
        self.rank = int(os.environ.get(DP_RANK, "0"))
        self.world_size = int(os.environ.get(DP_WORLD_SIZE, "1"))

    def load(self) -> Job:
        with self.db.session() as s:
            job = s.scalar(select(Job).where(Job.id == self.job_id))
            if job is None:
                raise JobGone(self.job_id)
            return job

    def mine(self, *statuses: str):
        """The conditions of an update that only applies while the job is ours, in `statuses`."""
        return [Job.id == self.job_id, Job.worker_id == self.worker_id, Job.status.in_(statuses)]

    def fail(self, *, code: str, message: str, param: str | None = None) -> bool:
        return queue.fail(
            self.db, job_id=self.job_id, worker_id=self.worker_id, code=code, message=message, param=param
        )

    def ended(self) -> bool:
        """The job was cancelled or failed while this process ran it (still ours: not taken
        over). A paused job keeps its state, to resume from."""
        state = queue.job_state(self.db, self.job_id)
        return state is not None and state[1] == self.worker_id and state[0] in st.TERMINAL

    def file_path(self, file_id: str, param: str) -> Path:
        """An input file of the job on disk; FileProblem when it was deleted meanwhile."""
        with self.db.session() as s:
            row = s.scalar(select(File).where(File.id == file_id))
        path = self.files.path(row.path) if row else None
        if path is None or not path.exists():
            raise FileProblem(
                param, f"The {param.replace('_', ' ')} {file_id} was deleted before the job could use it."
            )
        return path

    def input_files(self, *named: tuple[str, str | None]) -> list[Path | None] | None:
        """The job's input files on disk, for (param, file id) pairs (a None id gives None); a
        file deleted meanwhile fails the job (and gives None)."""
        try:
            return [self.file_path(file_id, param) if file_id else None for param, file_id in named]
        except FileProblem as e:
            self.fail(code="invalid_file", message=e.message, param=e.param)
            return None
