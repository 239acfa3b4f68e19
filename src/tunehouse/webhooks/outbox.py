"""Webhook endpoints per organization, and the outbox their deliveries wait in.

`enqueue_job_event` is called in the transaction that gives a job its final status, so the event
exists if and only if the status change does; the sender (webhooks/delivery.py) does the rest.
Payload: OpenAI's webhook event, `{"id": "evt_…", "object": "event", "created_at", "type":
"fine_tuning.job.succeeded|failed|cancelled", "data": {"id": "ftjob-…"}}`; an eval run (a job of
kind "eval_run") ends with `eval.run.succeeded|failed|canceled` and `{"id": "evalrun_…"}`; a batch
(kind "batch") with `batch.completed|failed|cancelled|expired` and `{"id": "batch_…"}`.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.store.tables import Job, WebhookDelivery, WebhookEndpoint, now

JOB_SUCCEEDED = "fine_tuning.job.succeeded"
JOB_FAILED = "fine_tuning.job.failed"
JOB_CANCELLED = "fine_tuning.job.cancelled"
EVAL_RUN_SUCCEEDED = "eval.run.succeeded"
EVAL_RUN_FAILED = "eval.run.failed"
EVAL_RUN_CANCELED = "eval.run.canceled"  # OpenAI's spelling, unlike fine_tuning.job.cancelled
BATCH_COMPLETED = "batch.completed"
BATCH_FAILED = "batch.failed"
BATCH_CANCELLED = "batch.cancelled"
BATCH_EXPIRED = "batch.expired"
EVENT_TYPES = (
    JOB_SUCCEEDED,
    JOB_FAILED,
    JOB_CANCELLED,
    EVAL_RUN_SUCCEEDED,
    EVAL_RUN_FAILED,
    EVAL_RUN_CANCELED,
    BATCH_COMPLETED,
    BATCH_FAILED,
    BATCH_CANCELLED,
    BATCH_EXPIRED,
)
# The queue ends every kind of job alike (jobs/queue.py fails a job with JOB_FAILED): a job of
# another kind announces its end under its own names.
KIND_EVENTS = {
    "eval_run": {
        JOB_SUCCEEDED: EVAL_RUN_SUCCEEDED,
        JOB_FAILED: EVAL_RUN_FAILED,
        JOB_CANCELLED: EVAL_RUN_CANCELED,
    },
    "batch": {JOB_SUCCEEDED: BATCH_COMPLETED, JOB_FAILED: BATCH_FAILED, JOB_CANCELLED: BATCH_CANCELLED},
}


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes."""
    return ids.webhook_secret()


def endpoint_dict(row: WebhookEndpoint, *, with_secret: bool = False) -> dict:
    return {
        "id": row.id,
        "object": "webhook_endpoint",
        "url": row.url,
        "events": list(row.events),
        "created_at": row.created_at,
        # Shown once, when the endpoint is created; later only its start, to tell secrets apart.
        "secret": row.secret if with_secret else None,
        "secret_prefix": row.secret[:10],
    }


def add_endpoint(
    session: Session, *, organization_id: str, url: str, events: list[str] | None = None
) -> WebhookEndpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(
            f"Invalid webhook url '{url}': it must be an http:// or https:// URL.", param="url"
        )
    events = list(dict.fromkeys(events or EVENT_TYPES))
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(
            f"Unknown webhook event type '{unknown[0]}'. Supported: {', '.join(EVENT_TYPES)}.",
            param="events",
            code="invalid_value",
        )
    row = WebhookEndpoint(
        id=ids.webhook_endpoint_id(),
        organization_id=organization_id,
        url=url,
        secret=new_secret(),
        events=events,
        created_at=now(),
    )
    session.add(row)
    session.flush()
    return row


def list_endpoints(session: Session, *, organization_id: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.organization_id == organization_id)
            .order_by(WebhookEndpoint.seq)
        )
    )


def remove_endpoint(session: Session, *, organization_id: str, endpoint_id: str) -> None:
    row = session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.organization_id == organization_id
        )
    )
    if row is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_id")
    for d in session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)):
        session.delete(d)
    session.delete(row)
    session.flush()


def enqueue_job_event(
    session: Session, *, job_id: str, event_type: str, organization_id: str | None = None
) -> int:
    """Queue `event_type` for `job_id` to every endpoint of its organization that wants it, in the
    caller's transaction. Returns the number of deliveries queued."""
    job = session.execute(select(Job.organization_id, Job.kind).where(Job.id == job_id)).first()
    if job is not None:
        event_type = KIND_EVENTS.get(job.kind, {}).get(event_type, event_type)
    if organization_id is None:
        organization_id = job.organization_id if job is not None else None
    endpoints = [
        e for e in list_endpoints(session, organization_id=organization_id) if event_type in e.events
    ]
    if not endpoints:
        return 0
    created = now()
    event_id = ids.webhook_event_id()
    payload = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "created_at": created,
            "type": event_type,
            "data": {"id": job_id},
        },
        separators=(",", ":"),
    )
    for e in endpoints:
        session.add(
            WebhookDelivery(
                id=ids.webhook_delivery_id(),
                organization_id=organization_id,
                endpoint_id=e.id,
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=time.time(),
                created_at=created,
            )
        )
    return len(endpoints)


def list_deliveries(session: Session, *, organization_id: str, limit: int = 100) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.organization_id == organization_id)
            .order_by(WebhookDelivery.seq.desc())
            .limit(limit)
        )
    )


def delivery_dict(d: WebhookDelivery) -> dict:
    return {
        "id": d.id,
        "object": "webhook_delivery",
        "endpoint_id": d.endpoint_id,
        "event_id": d.event_id,
        "type": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": d.created_at,
        "delivered_at": d.delivered_at,
    }
