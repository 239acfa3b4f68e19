"""Deleting a project or an organization: everything it owns goes, rows and bytes.

Order matters:
1. Active jobs are cancelled and taken from their worker in their own transaction first, so the
   training process stops writing (it checks its job every couple of seconds and exits when the
   job is no longer its own).
2. Rows go in one transaction, together with the audit entry.
3. Bytes go after the commit: the database is the truth, so a crash in between leaves unreferenced
   bytes (under the tenant's own prefix) rather than rows pointing at nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.jobs.events import add_event
from tunehouse.jobs.state_store import discard_training_state
from tunehouse.store import job_status as st
from tunehouse.store import uploads
from tunehouse.store.tables import (
    ApiKey,
    Batch,
    BatchOutput,
    Checkpoint,
    CheckpointPermission,
    Eval,
    EvalOutputItem,
    EvalRun,
    File,
    Job,
    MigrationImport,
    ModelAlias,
    Organization,
    Project,
    StoredCompletion,
    StoredResponse,
    Upload,
    now,
)
from tunehouse.tenancy import audit
from tunehouse.tenancy.projects import project_in_org
from tunehouse.tenancy.scope import result_file_ids

if TYPE_CHECKING:
    from tunehouse.config import Settings
    from tunehouse.store.blobs import Blobs
    from tunehouse.store.engine import Database
    from tunehouse.tenancy.auth import Principal


@dataclass
class Stores:
    """Where a tenant's bytes live: uploaded and result files, adapters, per-job work folders and
    training states (under the settings' home, and in the storage URL's store when there is one)."""

    files: Blobs
    weights: Blobs
    settings: Settings

    @classmethod
    def of(cls, state) -> Stores:
        """The stores of a server or a command: anything with `files`, `weights` and `settings`."""
        return cls(files=state.files, weights=state.weights, settings=state.settings)


@dataclass
class Deleted:
    files: int = 0
    jobs: int = 0
    checkpoints: int = 0
    keys: int = 0
    projects: int = 0
    evals: int = 0  # its runs are jobs (counted in `jobs`), its output items go with them
    uploads: int = 0  # with their parts
    batches: int = 0  # their jobs are counted in `jobs`, their output and error files in `files`
    blob_keys: list[str] = field(default_factory=list)


def _cancel_active(db: Database, job_filter) -> None:
    with db.transaction() as s:
        active = list(s.scalars(select(Job.id).where(job_filter, Job.status.notin_(st.TERMINAL))))
        if not active:
            return
        s.execute(
            update(Job)
            .where(Job.id.in_(active))
            .values(status=st.CANCELLED, finished_at=now(), worker_id=None, lease_expires_at=None)
        )
        for job_id in active:
            add_event(s, job_id, "Fine-tuning job cancelled: its project or organization is being deleted")


def _delete_evals(session, eval_filter) -> int:
    """Evals, their runs and the runs' output items (the runs' jobs go with the other jobs)."""
    eval_ids = list(session.scalars(select(Eval.id).where(eval_filter)))
    if eval_ids:
        runs = select(EvalRun.id).where(EvalRun.eval_id.in_(eval_ids))
        session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(runs)))
        session.execute(delete(EvalRun).where(EvalRun.eval_id.in_(eval_ids)))
        session.execute(delete(Eval).where(Eval.id.in_(eval_ids)))
    return len(eval_ids)


def _delete_batches(session, batch_filter) -> tuple[int, list[str]]:
    """Batches and their lines' rows (their jobs go with the other jobs, their output files with
    the other files); returns how many, and the blob keys of their plans."""
    rows = list(session.execute(select(Batch.id, Batch.plan_path).where(batch_filter)))
    batch_ids = [r.id for r in rows]
    if batch_ids:
        session.execute(delete(BatchOutput).where(BatchOutput.batch_id.in_(batch_ids)))
        session.execute(delete(Batch).where(Batch.id.in_(batch_ids)))
    return len(rows), [r.plan_path for r in rows if r.plan_path]


def _delete_uploads(session, upload_filter) -> list[tuple[str, str]]:
    """Uploads and their parts' rows; returns (organization id, upload id) of each, for the bytes."""
    rows = [
        (r.organization_id, r.id)
        for r in session.execute(select(Upload.organization_id, Upload.id).where(upload_filter))
    ]
    uploads.discard_parts(session, [u for _, u in rows])
    session.execute(delete(Upload).where(Upload.id.in_([u for _, u in rows])))
    return rows


def _delete_bytes(
    stores: Stores,
    *,
    organization_id: str,
    file_keys: list[str],
    weight_keys: list[str],
    job_ids: list[str],
) -> None:
    for key in file_keys:
        stores.files.delete(key)
    for key in weight_keys:
        stores.weights.delete(key)
    for job_id in job_ids:
        # Training states (here and in the store) and logs: they hold tokenized training data.
        discard_training_state(stores.settings, organization_id=organization_id, job_id=job_id)
        shutil.rmtree(Path(stores.settings.jobs_dir) / job_id, ignore_errors=True)


def delete_project(
    db: Database, stores: Stores, *, organization_id: str, project_id: str, actor: Principal | None
) -> Deleted:
    with db.session() as s:
        project = project_in_org(s, organization_id=organization_id, project_id=project_id)
        if project.is_default:
            raise InvalidRequest(
                "The default project cannot be deleted (it goes with its organization).",
                param="project_id",
                code="default_project",
            )
    in_project = (Job.organization_id == organization_id) & (Job.project_id == project_id)
    _cancel_active(db, in_project)
    out = Deleted(projects=1)
    with db.transaction() as s:
        job_ids = list(s.scalars(select(Job.id).where(in_project)))
        results = result_file_ids(s, organization_id=organization_id, project_id=project_id)
        files = list(
            s.scalars(
                select(File).where(
                    File.organization_id == organization_id,
                    (File.project_id == project_id) | File.id.in_(results),
                )
            )
        )
        ckpts = list(
            s.scalars(
                select(Checkpoint).where(
                    Checkpoint.organization_id == organization_id,
                    (Checkpoint.project_id == project_id) | Checkpoint.job_id.in_(job_ids),
                )
            )
        )
        out.files, out.jobs, out.checkpoints = len(files), len(job_ids), len(ckpts)
        ckpt_ids = [c.id for c in ckpts]
        s.execute(
            delete(CheckpointPermission).where(
                CheckpointPermission.checkpoint_id.in_(ckpt_ids)
                | (CheckpointPermission.project_id == project_id)
            )
        )
        s.execute(delete(Checkpoint).where(Checkpoint.id.in_(ckpt_ids)))
        out.evals = _delete_evals(
            s, (Eval.organization_id == organization_id) & (Eval.project_id == project_id)
        )
        upload_keys = _delete_uploads(
            s, (Upload.organization_id == organization_id) & (Upload.project_id == project_id)
        )
        out.uploads = len(upload_keys)
        out.batches, plan_keys = _delete_batches(
            s, (Batch.organization_id == organization_id) & (Batch.project_id == project_id)
        )
        s.execute(
            delete(StoredCompletion).where(
                (StoredCompletion.organization_id == organization_id)
                & (StoredCompletion.project_id == project_id)
            )
        )
        s.execute(
            delete(StoredResponse).where(
                (StoredResponse.organization_id == organization_id)
                & (StoredResponse.project_id == project_id)
            )
        )
        s.execute(delete(Job).where(Job.id.in_(job_ids)))  # events go with them (ON DELETE CASCADE)
        s.execute(delete(File).where(File.id.in_([f.id for f in files])))
        out.keys = s.execute(delete(ApiKey).where(ApiKey.project_id == project_id)).rowcount
        s.execute(delete(Project).where(Project.id == project_id))
        audit.record(
            s,
            organization_id=organization_id,
            project_id=project_id,
            actor=actor,
            action="project.deleted",
            object_id=project_id,
            details={
                "name": project.name,
                "files": out.files,
                "jobs": out.jobs,
                "checkpoints": out.checkpoints,
                "evals": out.evals,
                "uploads": out.uploads,
                "batches": out.batches,
                "api_keys": out.keys,
            },
        )
    uploads.delete_bytes(stores.files, upload_keys)
    weight_keys = [c.path for c in ckpts] + [f"{organization_id}/{j}" for j in job_ids]
    _delete_bytes(
        stores,
        organization_id=organization_id,
        file_keys=[f.path for f in files] + plan_keys,
        weight_keys=weight_keys,
        job_ids=job_ids,
    )
    return out


def delete_organization(
    db: Database, stores: Stores, *, organization_id: str, actor: Principal | None
) -> Deleted:
    with db.session() as s:
        org = s.scalar(select(Organization).where(Organization.id == organization_id))
        if org is None:
            raise NotFound(f"No such organization: {organization_id}", param="organization")
        org_name = org.name
    _cancel_active(db, Job.organization_id == organization_id)
    out = Deleted()
    with db.transaction() as s:
        job_ids = list(s.scalars(select(Job.id).where(Job.organization_id == organization_id)))
        file_keys = list(s.scalars(select(File.path).where(File.organization_id == organization_id)))
        ckpt_paths = list(
            s.scalars(select(Checkpoint.path).where(Checkpoint.organization_id == organization_id))
        )
        project_ids = list(s.scalars(select(Project.id).where(Project.organization_id == organization_id)))
        out.files, out.jobs, out.checkpoints, out.projects = (
            len(file_keys),
            len(job_ids),
            len(ckpt_paths),
            len(project_ids),
        )
        # Explicit, child tables first: the result does not depend on the database's cascades.
        s.execute(
            delete(CheckpointPermission).where(
                (CheckpointPermission.organization_id == organization_id)
                | CheckpointPermission.project_id.in_(project_ids)
            )
        )
        s.execute(delete(Checkpoint).where(Checkpoint.organization_id == organization_id))
        out.evals = _delete_evals(s, Eval.organization_id == organization_id)
        upload_keys = _delete_uploads(s, Upload.organization_id == organization_id)
        out.uploads = len(upload_keys)
        out.batches, _ = _delete_batches(s, Batch.organization_id == organization_id)
        s.execute(delete(StoredCompletion).where(StoredCompletion.organization_id == organization_id))
        s.execute(delete(StoredResponse).where(StoredResponse.organization_id == organization_id))
        s.execute(delete(ModelAlias).where(ModelAlias.organization_id == organization_id))
        s.execute(delete(MigrationImport).where(MigrationImport.organization_id == organization_id))
        s.execute(delete(Job).where(Job.organization_id == organization_id))
        s.execute(delete(File).where(File.organization_id == organization_id))
        out.keys = s.execute(delete(ApiKey).where(ApiKey.organization_id == organization_id)).rowcount
        s.execute(delete(Project).where(Project.organization_id == organization_id))
        s.execute(delete(Organization).where(Organization.id == organization_id))
        audit.record(
            s,
            organization_id=organization_id,
            actor=actor,
            action="organization.deleted",
            object_id=organization_id,
            details={
                "name": org_name,
                "projects": out.projects,
                "files": out.files,
                "jobs": out.jobs,
                "checkpoints": out.checkpoints,
                "evals": out.evals,
                "uploads": out.uploads,
                "batches": out.batches,
                "api_keys": out.keys,
            },
        )
    uploads.delete_bytes(stores.files, upload_keys)
    # Per-object keys, then the organization's own prefix (anything left under it is its too).
    _delete_bytes(
        stores,
        organization_id=organization_id,
        file_keys=file_keys + [organization_id],
        weight_keys=ckpt_paths + [f"{organization_id}/{j}" for j in job_ids] + [organization_id],
        job_ids=job_ids,
    )
    return out
