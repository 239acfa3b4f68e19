"""/v1/uploads as the API sees them: a file sent in parts (each streamed into storage as it
arrives), then completed into a normal File (the parts copied in the order given, a chunk at a
time, checked against the declared size and an optional MD5), or cancelled. An upload expires an
hour after it is created; expired uploads' parts are swept away (`sweep`). The rows and bytes
themselves are `tunehouse.store.uploads`.

Uploads belong to the caller's organization and project like files do (another organization's
upload is a 404), the file they make counts against the storage quota like an upload to
/v1/files, and a fine-tuning file gets the same checks as one sent to /v1/files.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sqlalchemy import update
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.api.files.service import check_file_format, check_purpose, clean_filename
from tunehouse.api.files.service import to_wire as file_to_wire
from tunehouse.api.files.upload import stream_multipart_to_file
from tunehouse.api.state import AppState
from tunehouse.api.uploads.protocol import CompleteUploadRequest, CreateUploadRequest, Upload, UploadPart
from tunehouse.errors import InvalidRequest, NotFound, PayloadTooLarge
from tunehouse.store import files, uploads
from tunehouse.store.tables import File, now
from tunehouse.store.tables import Upload as UploadRow
from tunehouse.store.tables import UploadPart as PartRow
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped
from tunehouse.usage.quotas import check_storage

log = logging.getLogger(__name__)

UPLOAD_TTL_SECONDS = 3600  # OpenAI's: an upload expires an hour after it is created
MAX_PART_BYTES = 64 * 1024 * 1024  # OpenAI's limit per part

# The MIME types each purpose accepts (parameters such as "; charset=utf-8" are ignored). JSON
# Lines has no registered type: every name in use is accepted.
JSONL_TYPES = frozenset(
    {
        "text/jsonl",
        "application/jsonl",
        "application/json",
        "application/x-ndjson",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/jsonlines+json",
    }
)
# OpenAI's file-search list (assistants and user_data), and images for vision.
DOCUMENT_TYPES = frozenset(
    {
        "text/plain",
        "text/markdown",
        "text/html",
        "text/csv",
        "text/css",
        "text/javascript",
        "text/x-c",
        "text/x-c++",
        "text/x-csharp",
        "text/x-golang",
        "text/x-java",
        "text/x-php",
        "text/x-python",
        "text/x-script.python",
        "text/x-ruby",
        "text/x-tex",
        "application/pdf",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/typescript",
        "application/x-sh",
    }
)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
MIME_TYPES: dict[str, frozenset[str]] = {
    "fine-tune": JSONL_TYPES,
    "batch": JSONL_TYPES,
    "evals": JSONL_TYPES,
    "assistants": DOCUMENT_TYPES | JSONL_TYPES,
    "user_data": DOCUMENT_TYPES | JSONL_TYPES,
    "vision": IMAGE_TYPES,
}


def to_wire(row: UploadRow, file: File | None = None) -> Upload:
    return Upload(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status=uploads.status_of(row),
        expires_at=row.expires_at,
        file=file_to_wire(file) if file is not None else None,
    )


def sweep(state: AppState) -> int:
    """Expire abandoned uploads and delete their parts; never fails its caller (housekeeping:
    the next sweep retries)."""
    try:
        n = uploads.sweep_expired(state.db, state.files)
    except Exception:
        log.warning("sweeping expired uploads failed", exc_info=True)
        n = 0
    try:  # files past their `expires_after` go with the same sweep
        files.sweep_expired(state.db, state.files)
    except Exception:
        log.warning("sweeping expired files failed", exc_info=True)
    return n


def _get(session: Session, principal: Principal, upload_id: str, *, lock: bool = False) -> UploadRow:
    stmt = scoped(UploadRow, principal).where(UploadRow.id == upload_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
    return row


def _require_pending(row: UploadRow, doing: str) -> None:
    status = uploads.status_of(row)
    if status != uploads.PENDING:
        raise InvalidRequest(
            f"Cannot {doing} Upload {row.id}: it is {status}"
            + (" (uploads expire an hour after they are created)." if status == uploads.EXPIRED else ".")
            + " Only a pending Upload can take parts, be completed or be cancelled.",
            param="upload_id",
            code="invalid_upload_status",
        )


def _check_mime_type(mime_type: str, purpose: str) -> None:
    base = mime_type.split(";", 1)[0].strip().lower()
    allowed = MIME_TYPES[purpose]
    if base not in allowed:
        example = "text/jsonl" if allowed is JSONL_TYPES else sorted(allowed)[0]
        raise InvalidRequest(
            f"Invalid value for 'mime_type': '{mime_type}' is not a supported MIME type for purpose "
            f"'{purpose}'. Supported: {', '.join(sorted(allowed))} (e.g. '{example}').",
            param="mime_type",
            code="invalid_value",
        )


def create_upload(state: AppState, *, principal: Principal, body: CreateUploadRequest) -> Upload:
    sweep(state)
    purpose = check_purpose(body.purpose)
    if not body.filename.strip():
        raise InvalidRequest(
            "Invalid value for 'filename': it is empty.", param="filename", code="invalid_value"
        )
    filename = clean_filename(body.filename)
    check_file_format(filename, purpose, param="filename")
    limit = state.settings.max_upload_bytes
    if body.bytes <= 0 or body.bytes > limit:
        raise InvalidRequest(
            f"Invalid value for 'bytes': {body.bytes}. An Upload must declare between 1 and {limit:,} "
            "bytes (the file size limit of this server).",
            param="bytes",
            code="invalid_value",
        )
    _check_mime_type(body.mime_type, purpose)
    with state.db.transaction() as session:
        # Refused now rather than after every part is sent: the file would not fit the storage quota.
        check_storage(state.settings, session, principal.organization_id, body.bytes)
        created = now()
        row = UploadRow(
            id=ids.upload_id(),
            organization_id=principal.organization_id,
            project_id=principal.owning_project_id,
            filename=filename,
            purpose=purpose,
            bytes=body.bytes,
            mime_type=body.mime_type[:256],
            status=uploads.PENDING,
            created_at=created,
            expires_at=created + UPLOAD_TTL_SECONDS,
            file_expires_after=body.expires_after.seconds if body.expires_after else None,
        )
        session.add(row)
    return to_wire(row)


def part_room(row: UploadRow, stored: int) -> int:
    """Bytes the upload's parts may still take: its declared size plus one part's worth (so a
    part sent again after a lost answer fits), less what is stored already."""
    return row.bytes + min(row.bytes, MAX_PART_BYTES) - stored


async def add_part(
    state: AppState,
    *,
    principal: Principal,
    upload_id: str,
    content_type: str | None,
    body: AsyncIterator[bytes],
) -> UploadPart:
    sweep(state)
    with state.db.session() as session:
        row = _get(session, principal, upload_id)
        _require_pending(row, "add a Part to")
        room = part_room(row, uploads.parts_bytes(session, upload_id))
    max_bytes = max(0, min(MAX_PART_BYTES, room))
    part_id, key = uploads.new_part(row)
    blob = state.files.writer(key)
    try:
        try:
            parsed = await stream_multipart_to_file(
                content_type,
                body,
                blob.open,
                max_bytes=max_bytes,
                file_field="data",
                expected="a `data` part",
            )
        except PayloadTooLarge:
            raise _part_too_large(row, room) from None
        if parsed.filename is None:
            raise InvalidRequest(
                "Missing required parameter: 'data'.", param="data", code="missing_required_parameter"
            )
        if parsed.fields:  # AddUploadPartRequest has `data` and nothing else
            name = sorted(parsed.fields)[0]
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter"
            )
        try:
            blob.commit()
        except FileNotFoundError:  # the sweeper took the upload's folder: it expired meanwhile
            with state.db.session() as session:
                _require_pending(_get(session, principal, upload_id), "add a Part to")
            raise
        try:
            with state.db.transaction() as session:
                # Again, under the upload's row lock: it may have been completed, cancelled or
                # filled by parallel parts meanwhile.
                row = _get(session, principal, upload_id, lock=True)
                _require_pending(row, "add a Part to")
                if parsed.bytes > part_room(row, uploads.parts_bytes(session, upload_id)):
                    raise _part_too_large(row, part_room(row, uploads.parts_bytes(session, upload_id)))
                part = PartRow(
                    id=part_id, upload_id=upload_id, bytes=parsed.bytes, path=key, created_at=now()
                )
                session.add(part)
        except Exception:
            state.files.delete(key)
            raise
        return UploadPart(id=part.id, created_at=part.created_at, upload_id=upload_id)
    finally:
        blob.abort()


def _part_too_large(row: UploadRow, room: int) -> InvalidRequest:
    if room < MAX_PART_BYTES:
        return InvalidRequest(
            f"This Part does not fit Upload {row.id}: its parts may total {row.bytes:,} bytes (the "
            f"declared size) plus one part's worth of parts sent again, and only {max(room, 0):,} "
            "bytes are left.",
            param="data",
            code="upload_too_large",
        )
    return InvalidRequest(
        f"This Part is too large: a Part may be at most {MAX_PART_BYTES:,} bytes (64 MB).",
        param="data",
        code="part_too_large",
    )


def complete_upload(
    state: AppState, *, principal: Principal, upload_id: str, body: CompleteUploadRequest
) -> Upload:
    sweep(state)
    with state.db.session() as session:
        row = _get(session, principal, upload_id)
        _require_pending(row, "complete")
        dupes = sorted({p for p in body.part_ids if body.part_ids.count(p) > 1})
        if dupes:
            raise InvalidRequest(
                f"Invalid value for 'part_ids': {', '.join(dupes)} listed more than once.",
                param="part_ids",
                code="invalid_value",
            )
        found = uploads.parts_by_id(session, upload_id, body.part_ids)
        unknown = [p for p in body.part_ids if p not in found]
        if unknown:
            raise InvalidRequest(
                f"Invalid value for 'part_ids': no Part {', '.join(unknown)} in Upload {upload_id}.",
                param="part_ids",
                code="invalid_value",
            )
        parts = [found[p] for p in body.part_ids]
    total = sum(p.bytes for p in parts)
    if total != row.bytes:
        raise InvalidRequest(
            f"The Parts listed hold {total:,} bytes, but Upload {upload_id} was created with "
            f"bytes={row.bytes:,}: the sizes must match.",
            param="part_ids",
            code="invalid_value",
        )
    file_id, key = files.new_file(organization_id=row.organization_id)
    blob = state.files.writer(key)
    try:
        size, md5 = uploads.assemble(state.files, parts, blob.open())
        if size != row.bytes:  # a part's bytes changed under us: never publish that
            raise InvalidRequest(
                f"The Parts' stored bytes ({size:,}) do not match bytes={row.bytes:,}.", param="part_ids"
            )
        if body.md5 is not None and body.md5.strip().lower() != md5:
            raise InvalidRequest(
                f"The MD5 checksum given ({body.md5}) does not match the uploaded bytes' ({md5}).",
                param="md5",
                code="invalid_value",
            )
        blob.commit()
        try:
            with state.db.transaction() as session:
                row = _get(session, principal, upload_id, lock=True)
                _require_pending(row, "complete")
                # As /v1/files does: the file must fit the organization's storage quota.
                check_storage(state.settings, session, row.organization_id, size)
                made = now()
                file = files.add_file(
                    session,
                    file_id=file_id,
                    key=key,
                    organization_id=row.organization_id,
                    project_id=row.project_id,
                    filename=row.filename,
                    purpose=row.purpose,
                    size=size,
                    expires_at=made + row.file_expires_after if row.file_expires_after else None,
                )
                file.created_at = made
                done = session.execute(
                    update(UploadRow)
                    .where(UploadRow.id == upload_id, UploadRow.status == uploads.PENDING)
                    .values(status=uploads.COMPLETED, file_id=file_id)
                )
                if done.rowcount != 1:
                    raise InvalidRequest(
                        f"Cannot complete Upload {upload_id}: it was completed or cancelled meanwhile.",
                        param="upload_id",
                        code="invalid_upload_status",
                    )
                # Listed parts are in the file now; unlisted ones are discarded.
                uploads.discard_parts(session, [upload_id])
                row.status, row.file_id = uploads.COMPLETED, file_id
        except Exception:
            files.delete_bytes(state.files, key)
            raise
    finally:
        blob.abort()
    uploads.delete_bytes(state.files, [(row.organization_id, upload_id)])
    return to_wire(row, file)


def cancel_upload(state: AppState, *, principal: Principal, upload_id: str) -> Upload:
    sweep(state)
    with state.db.transaction() as session:
        row = _get(session, principal, upload_id, lock=True)
        _require_pending(row, "cancel")
        row.status = uploads.CANCELLED
        uploads.discard_parts(session, [upload_id])
    uploads.delete_bytes(state.files, [(row.organization_id, upload_id)])
    return to_wire(row)
