"""Usage records: one row per (organization, project, key, model, UTC day, kind), incremented in place.

The increment is a single INSERT … ON CONFLICT DO UPDATE (SQLite ≥ 3.24 and PostgreSQL share the
syntax), so concurrent requests never lose an update and metering costs one small statement.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tunehouse.store.tables import UsageRecord

TRAINING = "training"
INFERENCE = "inference"
BATCH = "batch"  # inference through /v1/batches, at the batch price (prices.BATCH_DISCOUNT)
COUNTERS = ("input_tokens", "output_tokens", "training_tokens", "requests", "cost")
BUCKET_KEY = ("organization_id", "project_id", "key_id", "model", "day", "kind")
DAY_SECONDS = 86400


def utc_day(ts: float | None = None) -> dt.date:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).date()


def day_start(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def add_usage(
    session: Session,
    *,
    organization_id: str,
    project_id: str | None,
    key_id: str | None,
    model: str,
    kind: str,
    day: dt.date | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    training_tokens: int = 0,
    requests: int = 0,
    cost: float = 0.0,
) -> None:
    """Add to the bucket's counters (creating its row on first use), in the caller's transaction."""
    values = dict(
        organization_id=organization_id,
        project_id=project_id or "",
        key_id=key_id or "",
        model=model,
        kind=kind,
        day=day or utc_day(),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        training_tokens=training_tokens,
        requests=requests,
        cost=cost,
    )
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(UsageRecord).values(**values)
    elif dialect == "sqlite":
        stmt = sqlite.insert(UsageRecord).values(**values)
    else:  # pragma: no cover - tunehouse supports SQLite and PostgreSQL only
        raise NotImplementedError(f"usage metering does not support the {dialect} dialect")
    stmt = stmt.on_conflict_do_update(
        index_elements=list(BUCKET_KEY),
        set_={c: getattr(UsageRecord, c) + getattr(stmt.excluded, c) for c in COUNTERS},
    )
    session.execute(stmt)


def training_tokens_on(session: Session, *, organization_id: str, day: dt.date) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(UsageRecord.training_tokens), 0)).where(
                UsageRecord.organization_id == organization_id,
                UsageRecord.day == day,
                UsageRecord.kind == TRAINING,
            )
        )
        or 0
    )


@dataclass
class Row:
    """One result of a bucket: the group's keys (None where not grouped) and the sums."""

    day: dt.date
    project_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    kind: str | None = None
    sums: dict[str, float] = field(default_factory=dict)


def aggregate(
    session: Session,
    *,
    organization_id: str,
    start: dt.date,
    end: dt.date,
    kinds: tuple[str, ...],
    group_by: tuple[str, ...] = (),
    project_ids: list[str] | None = None,
    key_ids: list[str] | None = None,
    models: list[str] | None = None,
) -> list[Row]:
    """Sums per day in [start, end) for one organization, grouped by any of project_id, key_id,
    model and kind."""
    cols = {"project_id": UsageRecord.project_id, "key_id": UsageRecord.key_id}
    cols |= {"model": UsageRecord.model, "kind": UsageRecord.kind}
    groups = [cols[g] for g in group_by]
    stmt = (
        select(UsageRecord.day, *groups, *(func.sum(getattr(UsageRecord, c)).label(c) for c in COUNTERS))
        .where(
            UsageRecord.organization_id == organization_id,
            UsageRecord.day >= start,
            UsageRecord.day < end,
            UsageRecord.kind.in_(kinds),
        )
        .group_by(UsageRecord.day, *groups)
        .order_by(UsageRecord.day, *groups)
    )
    if project_ids is not None:
        stmt = stmt.where(UsageRecord.project_id.in_(project_ids))
    if key_ids is not None:
        stmt = stmt.where(UsageRecord.key_id.in_(key_ids))
    if models is not None:
        stmt = stmt.where(UsageRecord.model.in_(models))
    out = []
    for r in session.execute(stmt):
        m = r._mapping
        keys = {g: (m[g] or None) for g in group_by}  # "" (none) reads back as null
        out.append(Row(day=m["day"], **keys, sums={c: m[c] or 0 for c in COUNTERS}))
    return out
