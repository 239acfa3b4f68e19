"""Quotas per organization: the settings' defaults, overridden per organization in a table.

Checked where the thing would be created, before anything is written, so a refusal leaves nothing
behind: a job (concurrent jobs, training tokens per day) and an upload (storage bytes). A refusal
is a 429 of type `insufficient_quota` and code `quota_exceeded`, OpenAI's shape for quota errors;
its message names the quota, the limit and the current use. The rate-limit middleware marks these
429s `x-should-retry: false`: waiting a few seconds does not free a quota.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tunehouse.config import Settings
from tunehouse.data.analysis import check_files, context_length_for
from tunehouse.errors import RateLimited
from tunehouse.store import job_status as st
from tunehouse.store.catalog import resolve_base_model
from tunehouse.store.tables import File, Job, Organization, OrganizationQuota, now
from tunehouse.usage.prices import price_for
from tunehouse.usage.records import training_tokens_on, utc_day

UNLIMITED = -1  # stored in an override: no limit, whatever the default
QUOTA_FIELDS = (
    "free_training_tokens_per_day",
    "max_training_tokens_per_day",
    "max_concurrent_jobs",
    "max_storage_bytes",
    "requests_per_minute",
    "tokens_per_minute",
)
# Jobs that hold (or are about to hold) a worker: a paused job holds nothing.
CONCURRENT_STATUSES = (st.VALIDATING, st.QUEUED, st.RUNNING)


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    default_code = "quota_exceeded"


@dataclass(frozen=True)
class Quotas:
    """None: unlimited."""

    free_training_tokens_per_day: int
    max_training_tokens_per_day: int | None
    max_concurrent_jobs: int | None
    max_storage_bytes: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _defaults(settings: Settings) -> dict:
    return {
        "free_training_tokens_per_day": settings.free_training_tokens_per_day,
        "max_training_tokens_per_day": settings.max_training_tokens_per_day,
        "max_concurrent_jobs": settings.max_concurrent_jobs,
        "max_storage_bytes": settings.max_storage_bytes,
        "requests_per_minute": settings.rate_limit_requests_per_minute or None,
        "tokens_per_minute": settings.rate_limit_tokens_per_minute or None,
    }


def effective_quotas(settings: Settings, session: Session, organization_id: str) -> Quotas:
    values = _defaults(settings)
    row = session.get(OrganizationQuota, organization_id)
    if row is not None:
        for f in QUOTA_FIELDS:
            v = getattr(row, f)
            if v is not None:
                values[f] = None if v == UNLIMITED else v
    values["free_training_tokens_per_day"] = values["free_training_tokens_per_day"] or 0
    return Quotas(**values)


def overrides(session: Session, organization_id: str) -> dict:
    row = session.get(OrganizationQuota, organization_id)
    return {f: (getattr(row, f) if row else None) for f in QUOTA_FIELDS}


def set_overrides(session: Session, organization_id: str, changes: dict[str, int | None]) -> dict:
    """Change some overrides: an int sets it (-1: unlimited), None goes back to the default."""
    unknown = set(changes) - set(QUOTA_FIELDS)
    if unknown:
        raise ValueError(f"unknown quota(s): {', '.join(sorted(unknown))}")
    for f, v in changes.items():
        if v is not None and v < UNLIMITED:
            raise ValueError(f"{f} must be a number ≥ 0, or -1 for unlimited")
    row = session.get(OrganizationQuota, organization_id)
    if row is None:
        row = OrganizationQuota(organization_id=organization_id)
        session.add(row)
    for f, v in changes.items():
        setattr(row, f, v)
    row.updated_at = now()
    session.flush()
    return overrides(session, organization_id)


# --- current use ---------------------------------------------------------------------------------


def concurrent_jobs(session: Session, organization_id: str) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.organization_id == organization_id, Job.status.in_(CONCURRENT_STATUSES))
    )


def training_tokens_today(session: Session, organization_id: str) -> tuple[int, int]:
    """(tokens metered today, tokens reserved by jobs not finished yet: their estimates)."""
    used = training_tokens_on(session, organization_id=organization_id, day=utc_day())
    reserved = session.scalar(
        select(func.coalesce(func.sum(Job.estimated_tokens), 0)).where(
            Job.organization_id == organization_id, Job.status.in_(st.ACTIVE)
        )
    )
    return used, int(reserved or 0)


def storage_bytes(session: Session, organization_id: str) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(File.bytes), 0)).where(File.organization_id == organization_id)
        )
        or 0
    )


def usage_summary(settings: Settings, session: Session, organization_id: str) -> dict:
    used, reserved = training_tokens_today(session, organization_id)
    return {
        "training_tokens_today": used,
        "training_tokens_reserved": reserved,
        "concurrent_jobs": concurrent_jobs(session, organization_id),
        "storage_bytes": storage_bytes(session, organization_id),
    }


# --- checks --------------------------------------------------------------------------------------


def check_concurrent_jobs(quotas: Quotas, session: Session, organization_id: str) -> None:
    limit = quotas.max_concurrent_jobs
    if limit is None:
        return
    n = concurrent_jobs(session, organization_id)
    if n + 1 > limit:
        raise QuotaExceeded(
            f"Quota exceeded: max_concurrent_jobs. This organization may have {limit:,} job(s) validating, "
            f"queued or running at once, and {n:,} are. Wait for one to finish, or cancel one."
        )


def check_training_tokens(quotas: Quotas, session: Session, organization_id: str, tokens: int) -> None:
    limit = quotas.max_training_tokens_per_day
    if limit is None:
        return
    used, reserved = training_tokens_today(session, organization_id)
    if used + reserved + tokens > limit:
        raise QuotaExceeded(
            f"Quota exceeded: max_training_tokens_per_day. This job needs about {tokens:,} billable "
            f"training tokens; the limit is {limit:,} per UTC day, and {used + reserved:,} are used "
            f"({used:,} by jobs finished today, {reserved:,} by jobs not finished yet)."
        )


def storage_room(settings: Settings, session: Session, organization_id: str) -> tuple[int | None, int]:
    """(bytes the organization may still store or None when unlimited, bytes it stores now)."""
    limit = effective_quotas(settings, session, organization_id).max_storage_bytes
    used = storage_bytes(session, organization_id)
    return (None if limit is None else max(0, limit - used)), used


def storage_exceeded(
    settings: Settings, session: Session, organization_id: str, size: int | None
) -> QuotaExceeded:
    limit = effective_quotas(settings, session, organization_id).max_storage_bytes
    used = storage_bytes(session, organization_id)
    what = f"this upload ({size:,} bytes)" if size is not None else "this upload"
    return QuotaExceeded(
        f"Quota exceeded: max_storage_bytes. The limit is {limit:,} bytes of files for this organization, "
        f"{used:,} are stored, and {what} does not fit. Delete files you no longer need."
    )


def check_storage(settings: Settings, session: Session, organization_id: str, size: int) -> None:
    room, _ = storage_room(settings, session, organization_id)
    if room is not None and size > room:
        raise storage_exceeded(settings, session, organization_id, size)


# --- job admission ---------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def estimate_tokens(
    settings: Settings, *, train_path: Path, base_model: str, method: str, n_epochs
) -> int | None:
    """Billable tokens (tokens × epochs) as the data check counts them; None when the file has
    errors (validation will fail the job with them)."""
    base = resolve_base_model(settings, base_model)
    report = check_files(
        train_path,
        tokenizer=_tokenizer(str(base.path)),
        context_length=context_length_for(base.path),
        method=method,
        n_epochs=n_epochs,
    )
    if not report.ok or not report.estimate:
        return None
    return int(report.estimate["billable_tokens"])


def admit_job(
    settings: Settings,
    session: Session,
    *,
    organization_id: str,
    base_model: str,
    train_path: Callable[[], Path],
    method: str,
    n_epochs,
) -> dict:
    """Refuse a job that would exceed a quota (before anything is written); else the billing
    columns for its row: the training price quoted now and, when a daily token quota applies, the
    estimate it was admitted on (otherwise validation fills the estimate in)."""
    quotas = effective_quotas(settings, session, organization_id)
    price = price_for(settings, base_model).training
    billing: dict = {"training_price": price}
    tokens = None
    if quotas.max_training_tokens_per_day is not None:
        # Only then is the file read here: counting tokens takes a tokenizer pass over it (before
        # the lock below, so that the lock is held for milliseconds).
        tokens = estimate_tokens(
            settings, train_path=train_path(), base_model=base_model, method=method, n_epochs=n_epochs
        )
    if quotas.max_concurrent_jobs is not None or tokens is not None:
        lock_admissions(session, organization_id)
    check_concurrent_jobs(quotas, session, organization_id)
    if tokens is not None:
        check_training_tokens(quotas, session, organization_id, tokens)
        billing |= {"estimated_tokens": tokens, "estimated_cost": round(tokens * price / 1e6, 10)}
    return billing


def lock_admissions(session: Session, organization_id: str) -> None:
    """Admit one job of this organization at a time, until the caller's transaction ends: two
    requests racing for the last slot (or the last tokens of the day) cannot both count the use
    before either has written its job. PostgreSQL: the organization's row, locked. SQLite: a write,
    which takes the database's write lock (its reads run outside transactions)."""
    org = Organization.id == organization_id
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Organization.id).where(org).with_for_update())
    else:
        session.execute(update(Organization).where(org).values(slug=Organization.slug))


def estimate_columns(job: Job, estimate: dict | None) -> dict:
    """The job's estimate columns from the validation phase's data check."""
    if not estimate or estimate.get("billable_tokens") is None:
        return {}
    tokens = int(estimate["billable_tokens"])
    price = job.training_price if job.training_price is not None else estimate.get("price_per_million_tokens")
    return {"estimated_tokens": tokens, "estimated_cost": round(tokens * float(price or 0) / 1e6, 10)}
