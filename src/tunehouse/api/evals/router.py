from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.evals import service
from tunehouse.api.evals.protocol import (
    CreateEvalRequest,
    CreateEvalRunRequest,
    Eval,
    EvalDeleted,
    EvalList,
    EvalRun,
    EvalRunDeleted,
    EvalRunList,
    EvalRunOutputItem,
    EvalRunOutputItemList,
    UpdateEvalRequest,
)

router = APIRouter(prefix="/v1/evals", tags=["evals"])

Limit = Annotated[int, Query(ge=1, le=100)]
Order = Literal["asc", "desc"]
RunStatus = Literal["queued", "in_progress", "completed", "canceled", "failed"]


@router.post("", response_model=Eval, status_code=201)
def create_eval(req: CreateEvalRequest, state: StateDep, session: SessionDep, principal: OrgDep) -> Eval:
    return service.create_eval(session, principal=principal, req=req, settings=state.settings)


@router.get("", response_model=EvalList)
def list_evals(
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> EvalList:
    return service.list_evals(
        session, principal=principal, after=after, limit=limit, order=order, order_by=order_by
    )


@router.get("/{eval_id}", response_model=Eval)
def retrieve_eval(eval_id: str, session: SessionDep, principal: OrgDep) -> Eval:
    return service.eval_to_wire(service.get_eval_row(session, principal=principal, eval_id=eval_id))


@router.post("/{eval_id}", response_model=Eval)
def update_eval(eval_id: str, req: UpdateEvalRequest, session: SessionDep, principal: OrgDep) -> Eval:
    return service.update_eval(session, principal=principal, eval_id=eval_id, req=req)


@router.delete("/{eval_id}", response_model=EvalDeleted)
def delete_eval(eval_id: str, state: StateDep, session: SessionDep, principal: OrgDep) -> EvalDeleted:
    return service.delete_eval(state, session, principal=principal, eval_id=eval_id)


@router.post("/{eval_id}/runs", response_model=EvalRun, status_code=201)
def create_run(
    eval_id: str,
    req: CreateEvalRunRequest,
    request: Request,
    state: StateDep,
    session: SessionDep,
    principal: OrgDep,
) -> EvalRun:
    return service.create_run(
        state, session, principal=principal, eval_id=eval_id, req=req, base_url=str(request.base_url)
    )


@router.get("/{eval_id}/runs", response_model=EvalRunList)
def list_runs(
    eval_id: str,
    request: Request,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: RunStatus | None = None,
) -> EvalRunList:
    return service.list_runs(
        session,
        principal=principal,
        eval_id=eval_id,
        after=after,
        limit=limit,
        order=order,
        status=status,
        base_url=str(request.base_url),
    )


@router.get("/{eval_id}/runs/{run_id}", response_model=EvalRun)
def retrieve_run(
    eval_id: str, run_id: str, request: Request, session: SessionDep, principal: OrgDep
) -> EvalRun:
    return service.get_run(
        session, principal=principal, eval_id=eval_id, run_id=run_id, base_url=str(request.base_url)
    )


# The spec cancels with POST .../runs/{run_id}; the official SDK posts to .../runs/{run_id}/cancel.
@router.post("/{eval_id}/runs/{run_id}", response_model=EvalRun)
@router.post("/{eval_id}/runs/{run_id}/cancel", response_model=EvalRun)
def cancel_run(
    eval_id: str, run_id: str, request: Request, session: SessionDep, principal: OrgDep
) -> EvalRun:
    return service.cancel_run(
        session, principal=principal, eval_id=eval_id, run_id=run_id, base_url=str(request.base_url)
    )


@router.delete("/{eval_id}/runs/{run_id}", response_model=EvalRunDeleted)
def delete_run(
    eval_id: str, run_id: str, state: StateDep, session: SessionDep, principal: OrgDep
) -> EvalRunDeleted:
    return service.delete_run(state, session, principal=principal, eval_id=eval_id, run_id=run_id)


@router.get("/{eval_id}/runs/{run_id}/output_items", response_model=EvalRunOutputItemList)
def list_output_items(
    eval_id: str,
    run_id: str,
    session: SessionDep,
    principal: OrgDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    # OpenAI's filter takes pass and fail; error (an item that could not be graded) is ours.
    status: Literal["pass", "fail", "error"] | None = None,
) -> EvalRunOutputItemList:
    return service.list_output_items(
        session,
        principal=principal,
        eval_id=eval_id,
        run_id=run_id,
        after=after,
        limit=limit,
        order=order,
        status=status,
    )


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", response_model=EvalRunOutputItem)
def retrieve_output_item(
    eval_id: str, run_id: str, output_item_id: str, session: SessionDep, principal: OrgDep
) -> EvalRunOutputItem:
    return service.get_output_item(
        session, principal=principal, eval_id=eval_id, run_id=run_id, output_item_id=output_item_id
    )
