"""Uploads as the system keeps them (OpenAI's /v1/uploads: one file sent in parts): an `Upload`
row, an `UploadPart` row per part, each part's bytes in the files store under
`<org>/uploads/<upload id>/<part id>`. Completing an upload copies the listed parts, in order,
into a new file (`tunehouse.store.files`); the parts' rows and bytes then go, as they do when the
upload is cancelled or expires (`sweep_expired`). No tenant scoping here: callers look rows up
through `tenancy.scope`.

As for files, the database is the truth: a part's bytes are written before its row is added and
deleted after the rows' deletion commits, so a crash leaves at worst unreferenced bytes under the
upload's folder (which the next deletion of that folder takes), never a row without bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import BinaryIO

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.store.blobs import Blobs
from tunehouse.store.engine import Database
from tunehouse.store.tables import Upload, UploadPart, now

log = logging.getLogger(__name__)

PENDING, COMPLETED, CANCELLED, EXPIRED = "pending", "completed", "cancelled", "expired"
COPY_CHUNK = 1024 * 1024  # assembly copies this much at a time: never a whole part in memory


def folder_key(organization_id: str, upload_id: str) -> str:
    """The folder of an upload's parts in the files store."""
    return f"{organization_id}/uploads/{upload_id}"


def new_part(upload: Upload) -> tuple[str, str]:
    """A fresh part id and the blob key its bytes go to."""
    part_id = ids.upload_part_id()
    return part_id, f"{folder_key(upload.organization_id, upload.id)}/{part_id}"


def status_of(row: Upload, at: int | None = None) -> str:
    """The status as the API reports it: a pending upload past its expiry is expired, whether or
    not the sweeper has been by yet."""
    if row.status == PENDING and (at if at is not None else now()) >= row.expires_at:
        return EXPIRED
    return row.status


def parts_bytes(session: Session, upload_id: str) -> int:
    """Bytes of the parts stored for an upload so far."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == upload_id)
        )
        or 0
    )


def parts_by_id(session: Session, upload_id: str, part_ids: Sequence[str]) -> dict[str, UploadPart]:
    """The upload's parts among `part_ids`, by id (ids of other uploads are not found)."""
    rows = session.scalars(
        select(UploadPart).where(UploadPart.upload_id == upload_id, UploadPart.id.in_(list(part_ids)))
    )
    return {p.id: p for p in rows}


def assemble(blobs: Blobs, parts: Sequence[UploadPart], out: BinaryIO) -> tuple[int, str]:
    """Copy the parts' bytes, in the order given, into `out`, a chunk at a time. Returns the bytes
    written and their MD5 (hex)."""
    md5 = hashlib.md5(usedforsecurity=False)
    n = 0
    for part in parts:
        with blobs.open_read(part.path) as f:
            while chunk := f.read(COPY_CHUNK):
                out.write(chunk)
                md5.update(chunk)
                n += len(chunk)
    return n, md5.hexdigest()


def discard_parts(session: Session, upload_ids: Sequence[str]) -> None:
    """Delete the uploads' part rows in the caller's transaction; delete their bytes with
    `delete_bytes` once it has committed."""
    if upload_ids:
        session.execute(delete(UploadPart).where(UploadPart.upload_id.in_(list(upload_ids))))


def delete_bytes(blobs: Blobs, uploads: Sequence[tuple[str, str]]) -> None:
    """Delete the part folders of (organization id, upload id) pairs."""
    for organization_id, upload_id in uploads:
        try:
            blobs.delete(folder_key(organization_id, upload_id))
        except Exception:  # noqa: BLE001 - housekeeping: unreferenced bytes, the next sweep retries
            log.warning("deleting the parts of upload %s failed", upload_id, exc_info=True)


def sweep_expired(db: Database, blobs: Blobs, *, limit: int = 100) -> int:
    """Mark pending uploads past their expiry as expired and delete their parts (rows, then
    bytes). Idempotent; returns how many uploads it expired. The server runs it at start, now
    and then, and before each /v1/uploads request."""
    at = now()
    with db.transaction() as s:
        rows = list(
            s.execute(
                select(Upload.id, Upload.organization_id)
                .where(Upload.status == PENDING, Upload.expires_at <= at)
                .limit(limit)
            )
        )
        if not rows:
            return 0
        upload_ids = [r.id for r in rows]
        # Only those still pending: one completed or cancelled meanwhile keeps its own outcome.
        s.execute(
            update(Upload).where(Upload.id.in_(upload_ids), Upload.status == PENDING).values(status=EXPIRED)
        )
        discard_parts(s, upload_ids)
    delete_bytes(blobs, [(r.organization_id, r.id) for r in rows])
    log.info("expired %d abandoned upload(s) and deleted their parts", len(rows))
    return len(rows)
