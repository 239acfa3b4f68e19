"""Stored chat completions (`store: true`): OpenAI's GET /v1/chat/completions (list, filtered by
`model` and `metadata[k]=v`), GET …/{id}, GET …/{id}/messages, POST …/{id} (new metadata) and
DELETE …/{id}. A completion is stored as it was answered, with the request's messages; only
non-streamed requests can be stored (a stream with `store: true` is refused, api/chat/service.py).
Scoped like files: an organization's admin keys see all its stored completions, a project's keys
their project's."""

from __future__ import annotations

from sqlalchemy.orm import Session

from tunehouse.api.chat.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    StoredCompletionDeleted,
    StoredCompletionList,
    StoredMessageList,
)
from tunehouse.api.pagination import page
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.store.tables import StoredCompletion
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped


def store(
    session: Session, *, principal: Principal, req: ChatCompletionRequest, answer: ChatCompletion
) -> None:
    session.add(
        StoredCompletion(
            id=answer.id,
            organization_id=principal.organization_id,
            project_id=principal.owning_project_id,
            model=answer.model,
            created_at=answer.created,
            metadata_=req.metadata,
            messages=[m.model_dump(exclude_none=True) for m in req.messages],
            response=answer.model_dump(mode="json"),
        )
    )


def to_wire(row: StoredCompletion) -> dict:
    return {**row.response, "metadata": row.metadata_}


def get_row(session: Session, *, principal: Principal, completion_id: str) -> StoredCompletion:
    row = session.scalar(scoped(StoredCompletion, principal).where(StoredCompletion.id == completion_id))
    if row is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.", param="completion_id")
    return row


def list_completions(
    session: Session,
    *,
    principal: Principal,
    model: str | None,
    metadata: dict[str, str] | None,
    after: str | None,
    limit: int,
    order: str,
) -> StoredCompletionList:
    stmt = scoped(StoredCompletion, principal)
    if model is not None:
        stmt = stmt.where(StoredCompletion.model == model)
    descending = order == "desc"
    if not metadata:
        rows, has_more = page(
            session, stmt, StoredCompletion, after=after, limit=limit, descending=descending
        )
    else:
        # JSON filtering differs between SQLite and PostgreSQL: filtered here, as jobs' metadata.
        candidates, _ = page(session, stmt, StoredCompletion, after=after, limit=10**9, descending=descending)
        matching = [
            r for r in candidates if all((r.metadata_ or {}).get(k) == v for k, v in metadata.items())
        ]
        rows, has_more = matching[:limit], len(matching) > limit
    data = [to_wire(r) for r in rows]
    return StoredCompletionList(
        data=data,
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
        has_more=has_more,
    )


def _message(completion_id: str, index: int, m: dict) -> dict:
    content = m.get("content")
    parts = None
    if isinstance(content, list):
        parts = content
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    out = {"id": f"{completion_id}-{index}", "role": m["role"], "content": content, "refusal": None}
    out["content_parts"] = parts
    for key in ("name", "tool_calls", "tool_call_id", "function_call"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def list_messages(
    session: Session, *, principal: Principal, completion_id: str, after: str | None, limit: int, order: str
) -> StoredMessageList:
    row = get_row(session, principal=principal, completion_id=completion_id)
    messages = [_message(row.id, i, m) for i, m in enumerate(row.messages)]
    if order == "desc":
        messages.reverse()
    if after is not None:
        at = next((i for i, m in enumerate(messages) if m["id"] == after), None)
        if at is None:
            raise InvalidRequest(
                f"Invalid 'after': no message with id '{after}' in this list.", param="after"
            )
        messages = messages[at + 1 :]
    data = messages[:limit]
    return StoredMessageList(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=len(messages) > limit,
    )


def update_metadata(
    session: Session, *, principal: Principal, completion_id: str, metadata: dict[str, str] | None
) -> dict:
    row = get_row(session, principal=principal, completion_id=completion_id)
    row.metadata_ = metadata
    session.commit()
    return to_wire(row)


def delete_completion(
    session: Session, *, principal: Principal, completion_id: str
) -> StoredCompletionDeleted:
    row = get_row(session, principal=principal, completion_id=completion_id)
    session.delete(row)
    session.commit()
    return StoredCompletionDeleted(id=completion_id, deleted=True)
