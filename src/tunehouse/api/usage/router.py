"""/v1/organization/usage/*, /v1/organization/costs (OpenAI's usage API), and tunehouse extensions:
/v1/organization/usage/fine_tuning, /v1/organization/quotas, /v1/organization/webhooks (admin keys only:
webhook endpoints are the organization's)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from tunehouse.api.deps import AdminDep, OrgDep, SessionDep, StateDep
from tunehouse.api.usage import service

router = APIRouter(prefix="/v1/organization", tags=["usage"])


def _list(request: Request, name: str) -> list[str] | None:
    """OpenAI's array query parameters: `name=a&name=b` or `name[]=a&name[]=b`."""
    values = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
    return values or None


def _usage_query(
    request: Request,
    start_time: int,
    end_time: int | None = None,
    bucket_width: str = "1d",
    limit: Annotated[int | None, Query()] = None,
    page: str | None = None,
    batch: bool | None = None,
) -> service.UsageQuery:
    return service.UsageQuery(
        start_time=start_time,
        end_time=end_time,
        bucket_width=bucket_width,
        limit=limit,
        page=page,
        project_ids=_list(request, "project_ids"),
        api_key_ids=_list(request, "api_key_ids"),
        models=_list(request, "models"),
        group_by=_list(request, "group_by"),
        batch=batch,
    )


UsageQueryDep = Annotated[service.UsageQuery, Depends(_usage_query)]


@router.get("/usage/completions")
def completions_usage(session: SessionDep, principal: OrgDep, query: UsageQueryDep) -> dict:
    return service.completions_usage(session, principal=principal, query=query)


@router.get("/usage/fine_tuning")
def fine_tuning_usage(session: SessionDep, principal: OrgDep, query: UsageQueryDep) -> dict:
    """tunehouse extension: billable training tokens and their cost, per day."""
    return service.fine_tuning_usage(session, principal=principal, query=query)


@router.get("/costs")
def costs(session: SessionDep, principal: OrgDep, query: UsageQueryDep) -> dict:
    return service.costs(session, principal=principal, query=query)


@router.get("/quotas")
def quotas(state: StateDep, session: SessionDep, principal: OrgDep) -> dict:
    """tunehouse extension: effective quotas, per-organization overrides and current use."""
    return service.quotas(state.settings, session, principal=principal)


class CreateWebhookRequest(BaseModel):
    url: str
    events: list[str] | None = None


@router.post("/webhooks")
def create_webhook(req: CreateWebhookRequest, session: SessionDep, principal: AdminDep) -> dict:
    """tunehouse extension: a webhook endpoint; its `secret` is in this answer only."""
    return service.create_webhook(session, principal=principal, url=req.url, events=req.events)


@router.get("/webhooks")
def list_webhooks(session: SessionDep, principal: AdminDep) -> dict:
    return service.list_webhooks(session, principal=principal)


@router.delete("/webhooks/{webhook_id}")
def delete_webhook(webhook_id: str, session: SessionDep, principal: AdminDep) -> dict:
    return service.delete_webhook(session, principal=principal, webhook_id=webhook_id)


@router.get("/webhook_deliveries")
def list_deliveries(
    session: SessionDep, principal: AdminDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict:
    """tunehouse extension: recent deliveries and their outcome, newest first."""
    return service.list_deliveries(session, principal=principal, limit=limit)
