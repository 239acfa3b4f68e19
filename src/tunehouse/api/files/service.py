"""/v1/files as the API sees them: multipart uploads streamed into storage within the storage
quota, lookups scoped to the caller, downloads, deletes (audited). The rows and bytes themselves,
under <files store>/<org>/<id>, are `tunehouse.store.files`."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.api.files.protocol import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject
from tunehouse.api.files.upload import stream_multipart_to_file
from tunehouse.api.pagination import page
from tunehouse.api.state import AppState
from tunehouse.errors import InvalidRequest, NotFound, PayloadTooLarge
from tunehouse.store import files
from tunehouse.store.tables import File, now
from tunehouse.tenancy import audit
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped_files
from tunehouse.usage.quotas import check_storage, storage_exceeded, storage_room

log = logging.getLogger(__name__)


def to_wire(row: File) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
    )


def check_purpose(purpose: str | None) -> str:
    """A purpose files may have (/v1/files and /v1/uploads accept the same ones)."""
    if not purpose:
        raise InvalidRequest(
            "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
        )
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid value for 'purpose': '{purpose}'. Supported values are: "
            + ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
            + ".",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def clean_filename(name: str) -> str:
    """Only the last path component is kept: the name is metadata, never a path on our disk."""
    return (os.path.basename(name.replace("\\", "/")) or "upload")[:512]


def check_file_format(filename: str, purpose: str, *, param: str) -> None:
    """The checks a file gets when it is uploaded, whole (/v1/files) or in parts (/v1/uploads)."""
    if purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
        raise InvalidRequest(
            f"Invalid file format for Fine-Tuning API. Must be .jsonl (got '{filename}').",
            param=param,
            code="invalid_file_format",
        )


FORM_FIELDS = {"purpose", "expires_after[anchor]", "expires_after[seconds]"}  # and the file itself


def expires_at_of(fields: dict[str, str]) -> int | None:
    """OpenAI's `expires_after` form fields: `anchor` "created_at" and `seconds` from 3600 (an
    hour) to 2592000 (30 days); any other form field is refused, never ignored."""
    for name in fields:
        if name not in FORM_FIELDS:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: '{name}'.", param=name, code="unknown_parameter"
            )
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(
            f"Invalid value for 'expires_after.anchor': {anchor!r}. Supported values are: 'created_at'.",
            param="expires_after.anchor",
            code="invalid_value" if anchor is not None else "missing_required_parameter",
        )
    try:
        value = int(seconds) if seconds is not None else None
    except ValueError:
        value = None
    if value is None or not 3600 <= value <= 2592000:
        raise InvalidRequest(
            f"Invalid value for 'expires_after.seconds': {seconds!r}. It must be an integer from 3600 "
            "(one hour) to 2592000 (30 days).",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return now() + value


async def upload_file(
    state: AppState, *, principal: Principal, content_type: str | None, body: AsyncIterator[bytes]
) -> FileObject:
    file_id, key = files.new_file(organization_id=principal.organization_id)
    # Streamed straight into storage under a temporary key, published by commit() below.
    blob = state.files.writer(key)
    # The storage quota (usage/quotas.py) caps the upload as it streams: nothing over it is kept.
    with state.db.session() as session:
        room, _ = storage_room(state.settings, session, principal.organization_id)
    max_bytes = (
        state.settings.max_upload_bytes if room is None else min(room, state.settings.max_upload_bytes)
    )
    try:
        try:
            parsed = await stream_multipart_to_file(content_type, body, blob.open, max_bytes=max_bytes)
        except PayloadTooLarge:
            if max_bytes < state.settings.max_upload_bytes:
                with state.db.session() as session:
                    raise storage_exceeded(state.settings, session, principal.organization_id, None) from None
            raise
        purpose = check_purpose(parsed.fields.get("purpose"))
        if parsed.filename is None:
            raise InvalidRequest(
                "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        filename = clean_filename(parsed.filename)
        check_file_format(filename, purpose, param="file")
        expires_at = expires_at_of(parsed.fields)
        blob.commit()
        try:
            with state.db.transaction() as session:
                # Again, counting what others stored meanwhile.
                check_storage(state.settings, session, principal.organization_id, parsed.bytes)
                row = files.add_file(
                    session,
                    file_id=file_id,
                    key=key,
                    organization_id=principal.organization_id,
                    project_id=principal.owning_project_id,
                    filename=filename,
                    purpose=purpose,
                    size=parsed.bytes,
                    expires_at=expires_at,
                )
        except Exception:
            files.delete_bytes(state.files, key)
            raise
        return to_wire(row)
    finally:
        blob.abort()


def get_file_row(session: Session, *, principal: Principal, file_id: str) -> File:
    row = session.scalar(scoped_files(session, principal).where(File.id == file_id))
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return row


def list_files(
    session: Session, *, principal: Principal, purpose: str | None, after: str | None, limit: int, order: str
) -> FileList:
    stmt = scoped_files(session, principal)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    rows, has_more = page(session, stmt, File, after=after, limit=limit, descending=order == "desc")
    data = [to_wire(r) for r in rows]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def file_path(state: AppState, row: File) -> Path:
    return files.file_path(state.files, row)


def delete_file(state: AppState, session: Session, *, principal: Principal, file_id: str) -> FileDeleted:
    row = get_file_row(session, principal=principal, file_id=file_id)
    key = files.delete_file(session, row)
    audit.record(
        session,
        organization_id=row.organization_id,
        project_id=row.project_id,
        actor=principal,
        action="file.deleted",
        object_id=file_id,
        details={"filename": row.filename, "purpose": row.purpose, "bytes": row.bytes},
    )
    session.commit()
    files.delete_bytes(state.files, key)
    return FileDeleted(id=file_id, deleted=True)
