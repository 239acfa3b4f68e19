"""Wire types of /v1/files, field for field as OpenAI's OpenAIFile."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_serializer

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None  # left out when the file does not expire (the schema has no null)
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None  # left out likewise

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        out = handler(self)
        for key in ("expires_at", "status_details"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
