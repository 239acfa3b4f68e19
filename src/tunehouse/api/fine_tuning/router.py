from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.fine_tuning import data_check, service
from tunehouse.api.fine_tuning.protocol import (
    CreateFineTuningJobRequest,
    DataCheckRequest,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
)

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/jobs", response_model=FineTuningJob)
def create_job(
    req: CreateFineTuningJobRequest, state: StateDep, session: SessionDep, principal: OrgDep
) -> FineTuningJob:
    return service.create_job(state.settings, session, files_store=state.files, principal=principal, req=req)


@router.get("/jobs", response_model=FineTuningJobList)
def list_jobs(
    request: Request,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 20,
) -> FineTuningJobList:
    # metadata[key]=value, OpenAI's deepObject style
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    return service.list_jobs(
        session, principal=principal, after=after, limit=limit, metadata=metadata or None
    )


@router.get("/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, session: SessionDep, principal: OrgDep) -> FineTuningJob:
    return service.to_wire(service.get_job_row(session, principal=principal, job_id=job_id))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, session: SessionDep, principal: OrgDep) -> FineTuningJob:
    return service.cancel_job(session, principal=principal, job_id=job_id)


@router.post("/jobs/{job_id}/pause", response_model=FineTuningJob)
def pause_job(job_id: str, session: SessionDep, principal: OrgDep) -> FineTuningJob:
    return service.pause_job(session, principal=principal, job_id=job_id)


@router.post("/jobs/{job_id}/resume", response_model=FineTuningJob)
def resume_job(job_id: str, session: SessionDep, principal: OrgDep) -> FineTuningJob:
    return service.resume_job(session, principal=principal, job_id=job_id)


@router.get("/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def list_events(
    job_id: str,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 20,
) -> FineTuningJobEventList:
    return service.list_events(session, principal=principal, job_id=job_id, after=after, limit=limit)


@router.get("/jobs/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10,
) -> FineTuningJobCheckpointList:
    return service.list_checkpoints(session, principal=principal, job_id=job_id, after=after, limit=limit)


@router.post("/data_checks")
async def check_data(req: DataCheckRequest, state: StateDep, session: SessionDep, principal: OrgDep) -> dict:
    """tunehouse extension: every problem in the files, token statistics and the cost estimate."""
    return await run_in_threadpool(data_check.check, state, session, principal=principal, req=req)
