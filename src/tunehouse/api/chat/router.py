from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tunehouse.api.chat import service, stored
from tunehouse.api.chat.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    StoredCompletionDeleted,
    StoredCompletionList,
    StoredMessageList,
    UpdateStoredCompletionRequest,
)
from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.serving import event_stream

router = APIRouter(prefix="/v1/chat", tags=["chat"])


@router.post("/completions", response_model=ChatCompletion, response_model_exclude_none=False)
async def create_chat_completion(
    req: ChatCompletionRequest, state: StateDep, session: SessionDep, principal: OrgDep
):
    spec = service.check_supported(req)
    # Resolving may convert the embedded model on first use: keep it off the event loop.
    model = await run_in_threadpool(
        resolve_for_inference, state, session, principal=principal, model=req.model
    )
    engine = state.inference
    if req.stream:
        events = await service.open_stream(state, principal, engine, model, req, spec)
        return event_stream(events)
    answer = await service.complete(state, principal, engine, model, req, spec)
    if req.store:
        await run_in_threadpool(_store, state, principal, req, answer)
    return answer


def _store(state, principal, req: ChatCompletionRequest, answer: ChatCompletion) -> None:
    with state.db.transaction() as s:
        stored.store(s, principal=principal, req=req, answer=answer)


# Stored chat completions (`store: true`)


@router.get("/completions", response_model=StoredCompletionList)
def list_stored(
    request: Request,
    session: SessionDep,
    principal: OrgDep,
    model: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
) -> StoredCompletionList:
    # metadata[key]=value, OpenAI's deepObject style
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    return stored.list_completions(
        session, principal=principal, model=model, metadata=metadata, after=after, limit=limit, order=order
    )


@router.get("/completions/{completion_id}")
def retrieve_stored(completion_id: str, session: SessionDep, principal: OrgDep) -> dict:
    return stored.to_wire(stored.get_row(session, principal=principal, completion_id=completion_id))


@router.get("/completions/{completion_id}/messages", response_model=StoredMessageList)
def list_stored_messages(
    completion_id: str,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
) -> StoredMessageList:
    return stored.list_messages(
        session, principal=principal, completion_id=completion_id, after=after, limit=limit, order=order
    )


@router.post("/completions/{completion_id}")
def update_stored(
    completion_id: str, body: UpdateStoredCompletionRequest, session: SessionDep, principal: OrgDep
) -> dict:
    service.check_metadata(body.metadata)
    return stored.update_metadata(
        session, principal=principal, completion_id=completion_id, metadata=body.metadata
    )


@router.delete("/completions/{completion_id}", response_model=StoredCompletionDeleted)
def delete_stored(completion_id: str, session: SessionDep, principal: OrgDep) -> StoredCompletionDeleted:
    return stored.delete_completion(session, principal=principal, completion_id=completion_id)
