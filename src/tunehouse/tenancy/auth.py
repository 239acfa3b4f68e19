"""API keys and who is calling. Keys are shown once and stored as sha256 hashes.

A key either belongs to a project (it sees only that project's objects, with a role) or is an
organization admin key (project_id NULL: it sees the whole organization and may manage it).
TUNEHOUSE_ADMIN_KEY is an admin key of the default organization that lives only in the settings.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.errors import InvalidRequest, NotFound, PermissionDenied, Unauthorized
from tunehouse.store.tables import ApiKey, Organization, Project, now
from tunehouse.tenancy import audit
from tunehouse.tenancy.projects import default_project, get_or_create_org, project_in_org

DEFAULT_ORG = "default"
# OpenAI's project roles (owner, member) plus a read-only one.
ROLES = ("owner", "member", "reader")
# Writing last_used_at on every request would turn every read into a write; once a minute is plenty.
LAST_USED_RESOLUTION_S = 60
# OpenAI's 403 message; what the caller lacks follows it.
INSUFFICIENT = "You have insufficient permissions for this operation."


@dataclass(frozen=True)
class Principal:
    """Who is calling: every query a service makes is scoped by this organization (and project)."""

    organization_id: str
    organization_slug: str
    key_id: str | None
    # The project whose objects the caller sees; None: the whole organization (an admin key).
    project_id: str | None = None
    # owner | member | reader. Admin keys are owners.
    role: str = "owner"
    # An organization admin key (may use /v1/organization/... and manage every project).
    is_admin: bool = True
    # Where objects made by an admin key without a project go: the organization's default project.
    default_project_id: str | None = None

    @property
    def owning_project_id(self) -> str | None:
        """The project new objects (files, jobs and so their checkpoints) belong to."""
        return self.project_id or self.default_project_id


def require_admin(principal: Principal) -> None:
    """The one rule for what only an organization admin may do (the /v1/organization API,
    webhooks, checkpoint permissions): an admin key, also while it acts inside one project with
    the OpenAI-Project header. A project's keys, whatever their role, may not."""
    if not principal.is_admin:
        raise PermissionDenied(
            INSUFFICIENT + " This endpoint needs an organization admin key.", code="insufficient_permissions"
        )


def require_writer(principal: Principal) -> None:
    """Read-only keys may only read: every request that changes something (POST, DELETE) is a
    write, including chat and completions, as with OpenAI's read-only keys (they lack the
    model.request scope)."""
    if principal.role == "reader":
        raise PermissionDenied(INSUFFICIENT + " This API key is read-only.", code="insufficient_permissions")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def redacted(row: ApiKey) -> str:
    """What lists show instead of the key: its first characters only."""
    return f"{row.prefix}..."


def _new_key_row(
    organization_id: str, *, name: str | None, project_id: str | None, role: str
) -> tuple[ApiKey, str]:
    plain = ids.api_key()
    row = ApiKey(
        id=ids.key_id(),
        organization_id=organization_id,
        key_hash=hash_key(plain),
        prefix=plain[:10],
        name=name,
        project_id=project_id,
        role=role,
    )
    return row, plain


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(
            f"Invalid value for 'role': '{role}'. Supported values are: "
            + ", ".join(f"'{r}'" for r in ROLES)
            + ".",
            param="role",
            code="invalid_value",
        )


def create_key(
    session: Session,
    *,
    org_name: str | None = None,
    organization_id: str | None = None,
    name: str | None = None,
    project_id: str | None = None,
    role: str = "owner",
    actor: Principal | None = None,
) -> tuple[ApiKey, str]:
    """A new key. Without a project it is an organization admin key (the organization, given by
    name, is created if needed). Returns the row and the plain key, which is never stored."""
    check_role(role)
    if organization_id is None:
        organization_id = get_or_create_org(session, org_name or DEFAULT_ORG).id
    if project_id is not None:
        project = project_in_org(session, organization_id=organization_id, project_id=project_id)
        if project.status != "active":
            raise InvalidRequest(
                f"Project {project_id} is archived.", param="project_id", code="project_archived"
            )
    elif role != "owner":
        raise InvalidRequest(
            "An organization admin key (no project) is always an owner; give a project for a member or reader key.",
            param="role",
        )
    row, plain = _new_key_row(organization_id, name=name, project_id=project_id, role=role)
    session.add(row)
    session.flush()
    audit.record(
        session,
        organization_id=organization_id,
        project_id=project_id,
        actor=actor,
        action="api_key.created",
        object_id=row.id,
        details={"name": name, "role": role, "project_id": project_id},
    )
    return row, plain


def has_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.seq).limit(1)) is not None


def authenticate(
    session: Session,
    authorization: str | None,
    *,
    admin_key: str | None,
    project_header: str | None = None,
    organization_header: str | None = None,
) -> Principal:
    """The caller of a request. `project_header` is OpenAI-Project: an admin key may use it to act
    inside one project; a project key may only name its own project."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code=None,
        )
    key = authorization[7:].strip()
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        org = get_or_create_org(session, DEFAULT_ORG)
        key_id, project_id, role = None, None, "owner"
    else:
        row = session.scalar(
            select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
        )
        if row is None:
            shown = key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "****"
            raise Unauthorized(f"Incorrect API key provided: {shown}.")
        org = session.scalar(select(Organization).where(Organization.id == row.organization_id))
        key_id, project_id, role = row.id, row.project_id, row.role
        t = now()
        if row.last_used_at is None or t - row.last_used_at >= LAST_USED_RESOLUTION_S:
            row.last_used_at = t
    if organization_header and organization_header != org.id:
        raise Unauthorized(
            f"The OpenAI-Organization header names {organization_header!r}, but this key belongs to another organization.",
            code="mismatched_organization",
        )
    is_admin = project_id is None
    if project_header:
        if is_admin:
            project = session.scalar(
                select(Project).where(Project.id == project_header, Project.organization_id == org.id)
            )
            if project is None:
                raise Unauthorized(
                    f"The OpenAI-Project header names {project_header!r}, which is not a project of this organization.",
                    code="mismatched_project",
                )
            project_id = project.id
        elif project_header != project_id:
            raise Unauthorized(
                f"The OpenAI-Project header names {project_header!r}, but this key belongs to another project.",
                code="mismatched_project",
            )
    default = default_project(session, org.id)
    if project_id is not None and project_id != default.id:
        status = session.scalar(select(Project.status).where(Project.id == project_id))
        if status != "active":
            raise Unauthorized(
                f"The project {project_id} is archived; its keys no longer work.", code="project_archived"
            )
    return Principal(
        organization_id=org.id,
        organization_slug=org.slug,
        key_id=key_id,
        project_id=project_id,
        role=role,
        is_admin=is_admin,
        default_project_id=default.id,
    )


def get_key(session: Session, *, organization_id: str, key_id: str, project_id: str | None) -> ApiKey:
    """A live key of the organization: of `project_id`, or (None) an admin key."""
    stmt = select(ApiKey).where(
        ApiKey.id == key_id, ApiKey.organization_id == organization_id, ApiKey.revoked_at.is_(None)
    )
    stmt = stmt.where(ApiKey.project_id == project_id if project_id else ApiKey.project_id.is_(None))
    row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"No such API key: {key_id}", param="key_id")
    return row


def list_keys(
    session: Session, *, organization_id: str, project_id: str | None, all_projects: bool = False
) -> list[ApiKey]:
    """Live keys, oldest first: admin keys (project None), one project's keys, or every key."""
    stmt = select(ApiKey).where(ApiKey.organization_id == organization_id, ApiKey.revoked_at.is_(None))
    if not all_projects:
        stmt = stmt.where(ApiKey.project_id == project_id if project_id else ApiKey.project_id.is_(None))
    return list(session.scalars(stmt.order_by(ApiKey.seq)))


def revoke_key(
    session: Session, key_id: str, *, organization_id: str | None = None, actor: Principal | None = None
) -> bool:
    stmt = select(ApiKey).where(ApiKey.id == key_id)
    if organization_id is not None:
        stmt = stmt.where(ApiKey.organization_id == organization_id)
    row = session.scalar(stmt)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now()
    audit.record(
        session,
        organization_id=row.organization_id,
        project_id=row.project_id,
        actor=actor,
        action="api_key.deleted",
        object_id=row.id,
        details={"name": row.name},
    )
    return True


def rotate_key(session: Session, row: ApiKey, *, actor: Principal | None = None) -> tuple[ApiKey, str]:
    """A new key with the same name, project and role; the old one is revoked in the same
    transaction, so exactly one of them works at any moment."""
    new, plain = _new_key_row(row.organization_id, name=row.name, project_id=row.project_id, role=row.role)
    row.revoked_at = now()
    session.add(new)
    session.flush()
    audit.record(
        session,
        organization_id=row.organization_id,
        project_id=row.project_id,
        actor=actor,
        action="api_key.rotated",
        object_id=new.id,
        details={"replaces": row.id, "name": row.name},
    )
    return new, plain
