"""Wire types of /v1/organization/base_models (a tunehouse extension: OpenAI has no such API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BaseModelCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="A Hugging Face model folder or .gguf file on the server.")
    name: str | None = Field(default=None, min_length=1, max_length=128)
    chat_template: str | None = Field(
        default=None, min_length=1, description="A Jinja chat template, for a model without one."
    )
    organizations: list[str] | None = Field(
        default=None, min_length=1, description="Organization names or ids that may use it; default: all."
    )


class MemoryBytes(BaseModel):
    serve: int
    train_lora: int
    train_full: int


class RegisteredBaseModel(BaseModel):
    object: Literal["base_model"] = "base_model"
    id: str
    name: str
    architecture: str
    model_type: str
    context_length: int
    parameters: int
    dtype: str
    memory_bytes: MemoryBytes
    organizations: list[str] | None
    source: str
    path: str
    created_at: int


class RegisteredBaseModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RegisteredBaseModel]


class RegisteredBaseModelDeleted(BaseModel):
    object: Literal["base_model.deleted"] = "base_model.deleted"
    id: str
    name: str
    deleted: bool
