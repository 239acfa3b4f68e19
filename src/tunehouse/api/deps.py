"""Dependency aliases routers use: the state, a DB session, and the caller (organization, project,
role). Roles are enforced here, once, for every route: a reader key may only read (OrgDep), and
only an organization admin key passes AdminDep (`tenancy.auth.require_admin`, the one admin rule)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from tunehouse.api.state import AppState
from tunehouse.tenancy.auth import Principal, authenticate, require_admin, require_writer

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_state(request: Request) -> AppState:
    return request.app.state.tunehouse


def get_session(state: Annotated[AppState, Depends(get_state)]) -> Iterator[Session]:
    with state.db.session() as session:
        yield session


def get_principal(
    state: Annotated[AppState, Depends(get_state)],
    authorization: Annotated[str | None, Header()] = None,
    openai_project: Annotated[str | None, Header()] = None,
    openai_organization: Annotated[str | None, Header()] = None,
) -> Principal:
    """Who is calling (authentication only; also called directly by middleware)."""
    with state.db.transaction() as session:
        return authenticate(
            session,
            authorization,
            admin_key=state.settings.admin_key,
            project_header=openai_project,
            organization_header=openai_organization,
        )


def get_caller(request: Request, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """The caller, allowed to make this request by its role."""
    if request.method not in READ_METHODS:
        require_writer(principal)
    return principal


def get_admin(principal: Annotated[Principal, Depends(get_caller)]) -> Principal:
    """Organization admin keys only (the /v1/organization/... API, webhooks). Checkpoint
    permissions check the same rule in their service, after the model is found: another
    organization's model must stay a 404, whoever asks."""
    require_admin(principal)
    return principal


StateDep = Annotated[AppState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]
OrgDep = Annotated[Principal, Depends(get_caller)]
AdminDep = Annotated[Principal, Depends(get_admin)]
