"""Organizations and their projects. Every organization has a default project, which holds what
its admin keys make and which can be neither archived nor deleted (only with the organization)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.store.tables import Organization, Project, now
from tunehouse.tenancy import audit

if TYPE_CHECKING:
    from tunehouse.tenancy.auth import Principal

DEFAULT_PROJECT_NAME = "Default project"


def find_org(session: Session, name_or_id: str) -> Organization | None:
    return session.scalar(
        select(Organization).where((Organization.name == name_or_id) | (Organization.id == name_or_id))
    )


def get_or_create_org(session: Session, name: str) -> Organization:
    org = session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        org = Organization(id=ids.org_id(), name=name, slug=ids.slugify(name))
        session.add(org)
        session.flush()
        default_project(session, org.id)
    return org


def default_project(session: Session, organization_id: str) -> Project:
    row = session.scalar(
        select(Project).where(Project.organization_id == organization_id, Project.is_default.is_(True))
    )
    if row is None:
        row = Project(
            id=ids.project_id(), organization_id=organization_id, name=DEFAULT_PROJECT_NAME, is_default=True
        )
        # Organizations get theirs when they are created (and from migration 0004 before that):
        # this is only a safety net, so a lost race ends in a unique-name error, not a second one.
        session.add(row)
        session.flush()
    return row


def _check_name(name: str | None) -> str:
    name = (name or "").strip()
    if not name or len(name) > 128:
        raise InvalidRequest("A project name of 1 to 128 characters is required.", param="name")
    return name


def create_project(session: Session, *, organization_id: str, name: str, actor: Principal | None) -> Project:
    name = _check_name(name)
    if session.scalar(
        select(Project.id).where(Project.organization_id == organization_id, Project.name == name)
    ):
        raise InvalidRequest(f"A project named '{name}' already exists.", param="name", code="project_exists")
    row = Project(id=ids.project_id(), organization_id=organization_id, name=name, status="active")
    session.add(row)
    session.flush()
    audit.record(
        session,
        organization_id=organization_id,
        project_id=row.id,
        actor=actor,
        action="project.created",
        object_id=row.id,
        details={"name": name},
    )
    return row


def project_in_org(session: Session, *, organization_id: str, project_id: str) -> Project:
    """The organization's project with this id (archived or not), or NotFound."""
    row = session.scalar(
        select(Project).where(Project.id == project_id, Project.organization_id == organization_id)
    )
    if row is None:
        raise NotFound(f"No such project: {project_id}", param="project_id")
    return row


def get_project(session: Session, *, organization_id: str, project_id: str) -> Project:
    """Like `project_in_org`, but also by name (for the command line)."""
    row = session.scalar(
        select(Project).where(
            (Project.id == project_id) | (Project.name == project_id),
            Project.organization_id == organization_id,
        )
    )
    if row is None:
        raise NotFound(f"No such project: {project_id}", param="project_id")
    return row


def list_projects(session: Session, *, organization_id: str, include_archived: bool):
    stmt = select(Project).where(Project.organization_id == organization_id)
    if not include_archived:
        stmt = stmt.where(Project.status == "active")
    return stmt


def rename_project(session: Session, row: Project, *, name: str, actor: Principal | None) -> Project:
    name = _check_name(name)
    if name != row.name and session.scalar(
        select(Project.id).where(Project.organization_id == row.organization_id, Project.name == name)
    ):
        raise InvalidRequest(f"A project named '{name}' already exists.", param="name", code="project_exists")
    old, row.name = row.name, name
    audit.record(
        session,
        organization_id=row.organization_id,
        project_id=row.id,
        actor=actor,
        action="project.updated",
        object_id=row.id,
        details={"name": name, "previous_name": old},
    )
    return row


def archive_project(session: Session, row: Project, *, actor: Principal | None) -> Project:
    """Archived projects keep their objects (admin keys still see them) but their keys stop working."""
    if row.is_default:
        raise InvalidRequest(
            "The default project cannot be archived.", param="project_id", code="default_project"
        )
    if row.status != "archived":
        row.status = "archived"
        row.archived_at = now()
        audit.record(
            session,
            organization_id=row.organization_id,
            project_id=row.id,
            actor=actor,
            action="project.archived",
            object_id=row.id,
        )
    return row
