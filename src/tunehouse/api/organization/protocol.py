"""Wire types of the administration API, in OpenAI's /v1/organization/... shapes.

tunehouse extensions are marked: `role` and `project_id` on keys, `value` on project keys (they
are created through the API here, not in a dashboard), and the delete/rotate responses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Project(BaseModel):
    id: str
    object: Literal["organization.project"] = "organization.project"
    name: str
    created_at: int
    archived_at: int | None
    status: Literal["active", "archived"]


class ProjectList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Project]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ProjectCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)


class ProjectUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)


class ProjectDeleted(BaseModel):
    """tunehouse extension: OpenAI projects can only be archived; here they can be deleted with
    everything they own."""

    id: str
    object: Literal["organization.project.deleted"] = "organization.project.deleted"
    deleted: bool
    files: int
    jobs: int
    checkpoints: int
    api_keys: int


class KeyOwner(BaseModel):
    """Keys here are not tied to people: OpenAI's service-account owner fits best."""

    type: Literal["service_account"] = "service_account"
    object: Literal["organization.service_account"] = "organization.service_account"
    id: str
    name: str | None
    created_at: int
    role: str


class ProjectKeyOwner(BaseModel):
    type: Literal["service_account"] = "service_account"
    service_account: KeyOwner


class ProjectApiKey(BaseModel):
    object: Literal["organization.project.api_key"] = "organization.project.api_key"
    redacted_value: str
    name: str | None
    created_at: int
    last_used_at: int | None
    id: str
    owner_project_access: Literal["active", "inactive"] = "active"
    owner: ProjectKeyOwner
    role: str  # extension: owner | member | reader
    project_id: str  # extension
    value: str | None = None  # extension: the key itself, only in the create and rotate answers


class ProjectApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProjectApiKey]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ProjectApiKeyCreateRequest(BaseModel):
    """tunehouse extension (OpenAI makes project keys in its dashboard)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=128)
    role: Literal["owner", "member", "reader"] = "member"


class ProjectApiKeyDeleted(BaseModel):
    object: Literal["organization.project.api_key.deleted"] = "organization.project.api_key.deleted"
    id: str
    deleted: bool


class AdminApiKey(BaseModel):
    object: Literal["organization.admin_api_key"] = "organization.admin_api_key"
    id: str
    name: str | None
    redacted_value: str
    created_at: int
    expires_at: int | None = None
    last_used_at: int | None
    owner: KeyOwner
    value: str | None = None  # only in the create and rotate answers


class AdminApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminApiKey]
    first_id: str | None
    last_id: str | None
    has_more: bool


class AdminApiKeyCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    # OpenAI's field; tunehouse keys do not expire yet, so a value is refused rather than ignored.
    expires_in_seconds: None = None


class AdminApiKeyDeleted(BaseModel):
    id: str
    object: Literal["organization.admin_api_key.deleted"] = "organization.admin_api_key.deleted"
    deleted: bool


class AuditLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CheckpointPermission(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str


class CheckpointPermissionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPermission]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CheckpointPermissionCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project_ids: list[str] = Field(min_length=1, max_length=100)


class CheckpointPermissionDeleted(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool
