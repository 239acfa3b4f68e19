"""Usage, costs, quotas and webhook endpoints as the organization API shows them.

OpenAI's usage API shape (`page` of `bucket`s, each with `results`) for completions and costs;
`/v1/organization/usage/fine_tuning` is a tunehouse extension in the same shape for training.
Buckets are whole UTC days (`bucket_width=1d`, the only width: records are kept per day); the first
bucket starts at the UTC midnight at or before `start_time`. A project key sees its project only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest
from tunehouse.usage import quotas as q
from tunehouse.usage.records import (
    BATCH,
    DAY_SECONDS,
    INFERENCE,
    TRAINING,
    Row,
    aggregate,
    day_start,
    utc_day,
)
from tunehouse.webhooks import outbox

# `batch`: requests through /v1/batches (usage kind "batch", at the batch price) or not.
COMPLETIONS_GROUPS = {"project_id": "project_id", "api_key_id": "key_id", "model": "model", "batch": "kind"}
FINE_TUNING_GROUPS = {"project_id": "project_id", "model": "model"}
COSTS_GROUPS = {"project_id": "project_id", "api_key_id": "key_id", "line_item": "line_item"}


def _project_scope(principal, project_ids: list[str] | None) -> list[str] | None:
    """A project key sees only its own project, whatever it asks for."""
    own = getattr(principal, "project_id", None)
    if own is None:
        return project_ids
    return [own] if project_ids is None or own in project_ids else []


@dataclass(frozen=True)
class UsageQuery:
    """The query parameters the usage and costs endpoints share; list filters are None when absent."""

    start_time: int
    end_time: int | None = None
    bucket_width: str = "1d"
    limit: int | None = None
    page: str | None = None
    project_ids: list[str] | None = None
    api_key_ids: list[str] | None = None
    models: list[str] | None = None
    group_by: list[str] | None = None
    batch: bool | None = None  # completions: batch requests only (true), the others only (false)


def _window(query: UsageQuery, max_limit: int) -> tuple[dt.date, dt.date, dt.date]:
    """(first day of this page, first day after it, first day after the whole range)."""
    if query.bucket_width != "1d":
        raise InvalidRequest(
            f"Invalid value for 'bucket_width': '{query.bucket_width}'. Usage is recorded per UTC day; use '1d'.",
            param="bucket_width",
            code="invalid_value",
        )
    start_time = query.start_time
    if start_time < 0:
        raise InvalidRequest("Invalid value for 'start_time'.", param="start_time", code="invalid_value")
    end_time = query.end_time if query.end_time is not None else int(dt.datetime.now(dt.UTC).timestamp())
    if end_time <= start_time:
        raise InvalidRequest("'end_time' must be after 'start_time'.", param="end_time", code="invalid_value")
    limit = 7 if query.limit is None else query.limit
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(
            f"Invalid value for 'limit': it must be between 1 and {max_limit}.",
            param="limit",
            code="invalid_value",
        )
    first = utc_day(start_time)
    if query.page is not None:
        try:
            first = max(first, dt.date.fromisoformat(query.page))
        except ValueError:
            raise InvalidRequest(
                f"Invalid 'page': '{query.page}'.", param="page", code="invalid_value"
            ) from None
    end = utc_day(end_time - 1) + dt.timedelta(days=1)
    stop = min(end, first + dt.timedelta(days=limit))
    return first, stop, end


def _check_groups(group_by: list[str] | None, allowed: dict) -> tuple[str, ...]:
    for g in group_by or []:
        if g not in allowed:
            raise InvalidRequest(
                f"Invalid value for 'group_by': '{g}'. Supported: {', '.join(allowed)}.",
                param="group_by",
                code="invalid_value",
            )
    return tuple(dict.fromkeys(group_by or []))


def _buckets(
    session: Session,
    principal,
    query: UsageQuery,
    *,
    max_limit: int,
    kinds: tuple[str, ...],
    group_by: tuple[str, ...],
    make: Callable[[Row], dict],
    **filters: list[str] | None,
) -> dict:
    """One page of daily buckets: each day in the page, with `make(row)` for that day's rows."""
    first, stop, end = _window(query, max_limit)
    rows = aggregate(
        session,
        organization_id=principal.organization_id,
        start=first,
        end=stop,
        kinds=kinds,
        group_by=group_by,
        project_ids=_project_scope(principal, query.project_ids),
        **filters,
    )
    results_by_day: dict[dt.date, list[dict]] = {}
    for r in rows:
        results_by_day.setdefault(r.day, []).append(make(r))
    data = []
    day = first
    while day < stop:
        start = day_start(day)
        data.append(
            {
                "object": "bucket",
                "start_time": start,
                "end_time": start + DAY_SECONDS,
                "results": results_by_day.get(day, []),
            }
        )
        day += dt.timedelta(days=1)
    has_more = stop < end
    return {
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": stop.isoformat() if has_more else None,
    }


def completions_usage(session: Session, *, principal, query: UsageQuery) -> dict:
    groups = _check_groups(query.group_by, COMPLETIONS_GROUPS)

    def make(r: Row) -> dict:
        return {
            "object": "organization.usage.completions.result",
            "input_tokens": int(r.sums["input_tokens"]),
            "output_tokens": int(r.sums["output_tokens"]),
            "input_cached_tokens": 0,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": int(r.sums["requests"]),
            "project_id": r.project_id,
            "user_id": None,
            "api_key_id": r.key_id,
            "model": r.model,
            "batch": (r.kind == BATCH) if r.kind is not None else None,
            "service_tier": None,
        }

    return _buckets(
        session,
        principal,
        query,
        max_limit=31,
        kinds={None: (INFERENCE, BATCH), True: (BATCH,), False: (INFERENCE,)}[query.batch],
        group_by=tuple(COMPLETIONS_GROUPS[g] for g in groups),
        make=make,
        key_ids=query.api_key_ids,
        models=query.models,
    )


def fine_tuning_usage(session: Session, *, principal, query: UsageQuery) -> dict:
    groups = _check_groups(query.group_by, FINE_TUNING_GROUPS)

    def make(r: Row) -> dict:
        return {
            "object": "organization.usage.fine_tuning.result",
            "trained_tokens": int(r.sums["training_tokens"]),
            "num_jobs": int(r.sums["requests"]),
            "amount": {"value": round(float(r.sums["cost"]), 10), "currency": "usd"},
            "project_id": r.project_id,
            "model": r.model,
        }

    return _buckets(
        session,
        principal,
        query,
        max_limit=31,
        kinds=(TRAINING,),
        group_by=tuple(FINE_TUNING_GROUPS[g] for g in groups),
        make=make,
        models=query.models,
    )


def costs(session: Session, *, principal, query: UsageQuery) -> dict:
    groups = _check_groups(query.group_by, COSTS_GROUPS)
    by = [COSTS_GROUPS[g] for g in groups if g != "line_item"]
    if "line_item" in groups:
        by += ["model", "kind"]  # a line item is "<model>, <training|inference|batch>"

    def make(r: Row) -> dict:
        line = f"{r.model}, {r.kind}" if "line_item" in groups else None
        tokens = r.sums["training_tokens"] + r.sums["input_tokens"] + r.sums["output_tokens"]
        return {
            "object": "organization.costs.result",
            "amount": {"value": round(float(r.sums["cost"]), 10), "currency": "usd"},
            "line_item": line,
            "project_id": r.project_id,
            "api_key_id": r.key_id,
            "quantity": int(tokens) if line else None,
            "quantity_unit": "tokens" if line else None,
        }

    return _buckets(
        session,
        principal,
        query,
        max_limit=180,
        kinds=(INFERENCE, BATCH, TRAINING),
        group_by=tuple(by),
        make=make,
        key_ids=query.api_key_ids,
    )


def quotas(settings: Settings, session: Session, *, principal) -> dict:
    """tunehouse extension: the organization's effective quotas, its overrides and current use."""
    org = principal.organization_id
    return {
        "object": "organization.quotas",
        "organization_id": org,
        "quotas": q.effective_quotas(settings, session, org).to_dict(),
        "overrides": q.overrides(session, org),
        "usage": q.usage_summary(settings, session, org),
    }


def create_webhook(session: Session, *, principal, url: str, events: list[str] | None) -> dict:
    row = outbox.add_endpoint(session, organization_id=principal.organization_id, url=url, events=events)
    session.commit()
    return outbox.endpoint_dict(row, with_secret=True)


def list_webhooks(session: Session, *, principal) -> dict:
    rows = outbox.list_endpoints(session, organization_id=principal.organization_id)
    return {"object": "list", "data": [outbox.endpoint_dict(r) for r in rows], "has_more": False}


def delete_webhook(session: Session, *, principal, webhook_id: str) -> dict:
    outbox.remove_endpoint(session, organization_id=principal.organization_id, endpoint_id=webhook_id)
    session.commit()
    return {"id": webhook_id, "object": "webhook_endpoint.deleted", "deleted": True}


def list_deliveries(session: Session, *, principal, limit: int) -> dict:
    rows = outbox.list_deliveries(session, organization_id=principal.organization_id, limit=limit)
    return {"object": "list", "data": [outbox.delivery_dict(d) for d in rows], "has_more": False}
