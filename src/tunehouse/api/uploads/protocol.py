"""Wire types of /v1/uploads, field for field as OpenAI's Upload, UploadPart, CreateUploadRequest
and CompleteUploadRequest (the parts' multipart body is parsed as it streams, in the service)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunehouse.api.files.protocol import FileObject


class FileExpirationAfter(BaseModel):
    """When the File made by completing the upload expires (the upload itself always expires an
    hour after it is created)."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=2592000)]


class CreateUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str
    # Checked in the service, against what /v1/files accepts, with the same message.
    purpose: str
    bytes: int
    mime_type: str
    expires_after: FileExpirationAfter | None = None


class CompleteUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str]
    md5: str | None = None


class Upload(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    expires_at: int
    file: FileObject | None = None


class UploadPart(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str
