"""Wire types of /v1/organization/model_aliases (a tunehouse extension: OpenAI has no aliases)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

# No whitespace or control characters: a model name as clients send it (colons and slashes allowed).
AliasName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\s\x00-\x1f]+$")]


class CreateAliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AliasName
    # A model name (base, fine-tuned, checkpoint) or a fine-tuning job id (ftjob-…).
    target: Annotated[str, StringConstraints(min_length=1, max_length=512)]


class ModelAlias(BaseModel):
    object: Literal["model_alias"] = "model_alias"
    name: str
    target: str
    # What the alias answers with now: the target model, or null while a target job has not
    # succeeded (or after the target was deleted; `status` says which).
    resolved_model: str | None
    status: Literal["ready", "pending", "missing"]
    created_at: int


class ModelAliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelAlias]


class ModelAliasDeleted(BaseModel):
    object: Literal["model_alias.deleted"] = "model_alias.deleted"
    name: str
    deleted: bool
