"""Stored responses (`store`, default true, and every background response): retrieve, delete,
`input_items`, and the conversation a `previous_response_id` continues. Scoped like stored chat
completions: an organization's admin keys see all its responses, a project's keys their project's;
another organization gets 404."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.api.responses.protocol import ResponseDeleted, ResponseItemList
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.store.tables import StoredResponse
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped

# What a background response says when the server process generating it stopped (killed, restarted)
# before it finished: nobody is left to finish it, so the first reader after its lease lapsed fails it.
ORPHANED = {
    "code": "server_error",
    "message": "The server process generating this background response stopped before it finished; "
    "create the response again.",
}


def save(
    session: Session,
    *,
    principal: Principal,
    response: dict,
    input_items: list[dict],
    lease_until: float | None = None,
) -> None:
    session.add(
        StoredResponse(
            id=response["id"],
            organization_id=principal.organization_id,
            project_id=principal.owning_project_id,
            model=response["model"],
            status=response["status"],
            created_at=response["created_at"],
            input_items=input_items,
            response=response,
            lease_until=lease_until,
        )
    )


def renew(session: Session, *, response_id: str, lease_until: float) -> None:
    row = session.scalar(select(StoredResponse).where(StoredResponse.id == response_id))
    if row is not None and row.status in ("queued", "in_progress"):
        row.lease_until = lease_until


def _settle(session: Session, row: StoredResponse) -> StoredResponse:
    """Fail a background response still in progress whose lease lapsed (see ORPHANED)."""
    if (
        row.status in ("queued", "in_progress")
        and row.lease_until is not None
        and row.lease_until < time.time()
    ):
        row.status = "failed"
        row.response = {**row.response, "status": "failed", "error": ORPHANED}
        session.commit()
    return row


def get_row(session: Session, *, principal: Principal, response_id: str) -> StoredResponse:
    row = session.scalar(scoped(StoredResponse, principal).where(StoredResponse.id == response_id))
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return _settle(session, row)


def finish(session: Session, *, response_id: str, response: dict) -> None:
    """A background response's end (completed, failed, cancelled), unless it ended meanwhile
    (cancelled, or failed by a reader who found its lease lapsed) or was deleted: an end is final."""
    row = session.scalar(select(StoredResponse).where(StoredResponse.id == response_id).with_for_update())
    if row is None or row.status not in ("queued", "in_progress"):
        return
    row.status = response["status"]
    row.response = response


def conversation(session: Session, *, principal: Principal, response_id: str) -> list[dict]:
    """The items a response continuing `response_id` starts from: its input items, then its output."""
    row = session.scalar(scoped(StoredResponse, principal).where(StoredResponse.id == response_id))
    if row is None:
        raise InvalidRequest(
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    row = _settle(session, row)
    if row.status in ("queued", "in_progress"):
        raise InvalidRequest(
            f"Previous response with id '{response_id}' is still in progress; wait until it has finished.",
            param="previous_response_id",
            code="invalid_value",
        )
    return list(row.input_items) + list(row.response.get("output") or [])


def delete(session: Session, *, principal: Principal, response_id: str) -> ResponseDeleted:
    row = get_row(session, principal=principal, response_id=response_id)
    session.delete(row)
    session.commit()
    return ResponseDeleted(id=response_id, deleted=True)


def list_input_items(
    session: Session, *, principal: Principal, response_id: str, after: str | None, limit: int, order: str
) -> ResponseItemList:
    row = get_row(session, principal=principal, response_id=response_id)
    items = list(row.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
        if at is None:
            raise InvalidRequest(f"Invalid 'after': no item with id '{after}' in this list.", param="after")
        items = items[at + 1 :]
    data = items[:limit]
    return ResponseItemList(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=len(items) > limit,
    )
