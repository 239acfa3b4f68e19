from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.responses import service, store
from tunehouse.api.responses.protocol import CreateResponseRequest, ResponseDeleted, ResponseItemList
from tunehouse.api.serving import event_stream
from tunehouse.errors import InvalidRequest

router = APIRouter(prefix="/v1/responses", tags=["responses"])


def _background(request: Request) -> dict[str, asyncio.Task]:
    """This app's running background responses, by id (cancel reaches them here)."""
    registry = getattr(request.app.state, "background_responses", None)
    if registry is None:
        registry = request.app.state.background_responses = {}
    return registry


def _no_include(include: list[str] | None) -> None:
    if include:
        raise InvalidRequest(
            "Unsupported parameter: 'include' is not supported here by this server: stored items are "
            "answered as they were stored.",
            param="include",
            code="unsupported_parameter",
        )


@router.post("")
async def create_response(
    req: CreateResponseRequest, request: Request, state: StateDep, session: SessionDep, principal: OrgDep
):
    # Resolving may convert the embedded model on first use: keep it off the event loop.
    model = await run_in_threadpool(
        resolve_for_inference, state, session, principal=principal, model=req.model
    )
    run = await service.prepare(state, session, principal, state.inference, model, req)
    if req.background:
        return await service.start_background(run, _background(request))
    if req.stream:
        return event_stream(await service.open_stream(run))
    return await service.complete(run)


@router.get("/{response_id}")
def retrieve_response(
    response_id: str,
    session: SessionDep,
    principal: OrgDep,
    include: Annotated[list[str] | None, Query()] = None,
    stream: bool | None = None,
    starting_after: int | None = None,
    include_obfuscation: bool | None = None,
) -> dict:
    _no_include(include)
    if stream:
        raise InvalidRequest(
            "Unsupported parameter: 'stream' is not supported by this server when retrieving a "
            "response: poll it instead.",
            param="stream",
            code="unsupported_parameter",
        )
    return store.get_row(session, principal=principal, response_id=response_id).response


@router.delete("/{response_id}", response_model=ResponseDeleted)
async def delete_response(
    response_id: str, request: Request, session: SessionDep, principal: OrgDep
) -> ResponseDeleted:
    task = _background(request).get(response_id)
    row = await run_in_threadpool(store.get_row, session, principal=principal, response_id=response_id)
    if task is not None and row is not None:
        task.cancel()  # a running background response stops first
        await asyncio.wait([task], timeout=10)
        session.expire_all()
    return await run_in_threadpool(store.delete, session, principal=principal, response_id=response_id)


@router.post("/{response_id}/cancel")
async def cancel_response(
    response_id: str, request: Request, state: StateDep, session: SessionDep, principal: OrgDep
) -> dict:
    return await service.cancel(state, session, principal, response_id, _background(request))


@router.get("/{response_id}/input_items", response_model=ResponseItemList)
def list_input_items(
    response_id: str,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: Annotated[list[str] | None, Query()] = None,
) -> ResponseItemList:
    _no_include(include)
    return store.list_input_items(
        session, principal=principal, response_id=response_id, after=after, limit=limit, order=order
    )
