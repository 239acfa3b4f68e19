from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from tunehouse.api.batches import service
from tunehouse.api.batches.protocol import Batch, BatchList, CreateBatchRequest
from tunehouse.api.deps import OrgDep, SessionDep, StateDep

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", response_model=Batch)
async def create_batch(req: CreateBatchRequest, state: StateDep, session: SessionDep, principal: OrgDep):
    # Reading and checking every line of the file (and resolving its model) is blocking work.
    return await run_in_threadpool(service.create_batch, state, session, principal=principal, req=req)


@router.get("", response_model=BatchList)
def list_batches(
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    return service.list_batches(session, principal=principal, after=after, limit=limit)


@router.get("/{batch_id}", response_model=Batch)
def retrieve_batch(batch_id: str, session: SessionDep, principal: OrgDep) -> Batch:
    return service.get_batch(session, principal=principal, batch_id=batch_id)


@router.post("/{batch_id}/cancel", response_model=Batch)
def cancel_batch(batch_id: str, session: SessionDep, principal: OrgDep) -> Batch:
    return service.cancel_batch(session, principal=principal, batch_id=batch_id)
