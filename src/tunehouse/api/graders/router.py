from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.graders import service
from tunehouse.api.graders.protocol import (
    RunGraderRequest,
    RunGraderResponse,
    ValidateGraderRequest,
    ValidateGraderResponse,
)

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["fine_tuning"])


@router.post("/run", response_model=RunGraderResponse, response_model_exclude_none=False)
async def run_grader(req: RunGraderRequest, state: StateDep, session: SessionDep, principal: OrgDep):
    # Grading blocks (a model grader waits for the engine, a python grader for its sandbox).
    return await run_in_threadpool(
        service.run_grader,
        state,
        session,
        principal=principal,
        grader=req.grader,
        model_sample=req.model_sample,
        item=req.item,
    )


@router.post("/validate", response_model=ValidateGraderResponse)
async def validate_grader(
    req: ValidateGraderRequest, state: StateDep, session: SessionDep, principal: OrgDep
):
    return await run_in_threadpool(
        service.validate_grader, state, session, principal=principal, grader=req.grader
    )
