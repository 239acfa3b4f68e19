"""Stored responses (`store`, default true, and every background response): retrieve, delete,
`input_items`, and the conversation a `previous_response_id` continues. Scoped like stored chat
completions: an organization's admin keys see all its responses, a project's keys their project's;
another organization gets 404."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.api.responses.protocol import ResponseDeleted, ResponseItemList
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.store.tables import StoredResponse
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped


def save(session: Session, *, principal: Principal, response: dict, input_items: list[dict]) -> None:
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
        )
    )


def get_row(session: Session, *, principal: Principal, response_id: str) -> StoredResponse:
    row = session.scalar(scoped(StoredResponse, principal).where(StoredResponse.id == response_id))
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return row


def finish(session: Session, *, response_id: str, response: dict) -> None:
    """A background response's end (completed, failed, cancelled), unless it was cancelled (or
    deleted) meanwhile: a cancel wins over a generation that ended after it."""
    row = session.scalar(select(StoredResponse).where(StoredResponse.id == response_id).with_for_update())
    if row is None or row.status == "cancelled":
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
