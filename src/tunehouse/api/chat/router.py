from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from tunehouse.api.chat import service
from tunehouse.api.chat.protocol import ChatCompletion, ChatCompletionRequest
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
    return await service.complete(state, principal, engine, model, req, spec)
