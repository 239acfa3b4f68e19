from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from tunehouse.api.completions import service
from tunehouse.api.completions.protocol import Completion, CompletionRequest
from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.serving import event_stream

router = APIRouter(prefix="/v1", tags=["completions"])


@router.post("/completions", response_model=Completion)
async def create_completion(req: CompletionRequest, state: StateDep, session: SessionDep, principal: OrgDep):
    service.check_supported(req)
    model = await run_in_threadpool(
        resolve_for_inference, state, session, principal=principal, model=req.model
    )
    engine = state.inference
    if req.stream:
        events = await service.open_stream(state, principal, engine, model, req)
        return event_stream(events)
    return await service.complete(state, principal, engine, model, req)
