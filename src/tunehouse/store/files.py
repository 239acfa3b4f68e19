"""Files as the system keeps them: one `File` row each, its bytes in the files store under
`<org>/<file id>`. Plain functions over a SQLAlchemy session and a blob store, used by the HTTP
layer (uploads, downloads, deletes) and by the worker (result files); no tenant scoping here:
callers look rows up through `tenancy.scope` when a caller's access matters.

The database is the truth: bytes are written before their row is added, and deleted after the
row's deletion commits, so a crash leaves at worst unreferenced bytes, never a row without bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.store.blobs import Blobs
from tunehouse.store.tables import File, now

PROCESSED = "processed"


log = logging.getLogger(__name__)


def blob_key(organization_id: str, file_id: str) -> str:
    """Where a file's bytes live in the files store."""
    return f"{organization_id}/{file_id}"


def new_file(*, organization_id: str) -> tuple[str, str]:
    """A fresh file id and the blob key its bytes go to."""
    file_id = ids.file_id()
    return file_id, blob_key(organization_id, file_id)


def add_file(
    session: Session,
    *,
    file_id: str,
    key: str,
    organization_id: str,
    project_id: str | None,
    filename: str,
    purpose: str,
    size: int,
    expires_at: int | None = None,
) -> File:
    """The row of a file whose bytes are already stored under `key`, added to the caller's
    transaction (not committed)."""
    row = File(
        id=file_id,
        organization_id=organization_id,
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        status=PROCESSED,
        path=key,
        expires_at=expires_at,
    )
    session.add(row)
    return row


def create_file(
    session: Session,
    blobs: Blobs,
    *,
    organization_id: str,
    filename: str,
    purpose: str,
    data: bytes,
    project_id: str | None = None,
) -> File:
    """A file the system makes itself (a job's result CSV): the bytes are stored now, the row is
    added to the caller's transaction. If that transaction rolls back, delete the bytes with
    `delete_bytes(blobs, row.path)`."""
    file_id, key = new_file(organization_id=organization_id)
    blobs.write_bytes(key, data)
    return add_file(
        session,
        file_id=file_id,
        key=key,
        organization_id=organization_id,
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        size=len(data),
    )


def get_file(session: Session, file_id: str) -> File | None:
    """A file by id, whoever owns it (the worker's lookup: ownership was checked when the job was made)."""
    return session.scalar(select(File).where(File.id == file_id))


def file_path(blobs: Blobs, row: File) -> Path:
    """A local path holding the file's bytes (downloaded into the store's cache when the store is
    remote); the path does not exist when the bytes are gone."""
    return blobs.path(row.path)


def delete_file(session: Session, row: File) -> str:
    """Delete the row in the caller's transaction; returns its blob key, for `delete_bytes` once
    the transaction has committed."""
    session.delete(row)
    return row.path


def delete_bytes(blobs: Blobs, key: str) -> None:
    blobs.delete(key)


def sweep_expired(db, blobs: Blobs, *, limit: int = 100) -> int:
    """Delete files past their `expires_at` (set from `expires_after` at upload): rows, then
    bytes. Idempotent; returns how many it deleted. The server runs it with the uploads sweep
    (api/uploads/service.py `sweep`); an expired file is already a 404 before it runs
    (tenancy/scope.py `scoped_files`)."""
    at = now()
    with db.transaction() as session:
        rows = list(
            session.scalars(
                select(File).where(File.expires_at.is_not(None), File.expires_at <= at).limit(limit)
            )
        )
        keys = [delete_file(session, row) for row in rows]
    for key in keys:
        try:
            delete_bytes(blobs, key)
        except Exception:  # noqa: BLE001 - housekeeping: unreferenced bytes, nothing reads them
            log.warning("could not delete the bytes of an expired file (%s)", key, exc_info=True)
    if rows:
        log.info("deleted %d expired file(s)", len(rows))
    return len(rows)
