"""Cursor pagination as OpenAI does it: `after=<id of the last item seen>`, `limit`, `has_more`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from tunehouse.errors import InvalidRequest


def page(
    session: Session,
    stmt: Select,
    table: Any,
    *,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> tuple[list[Any], bool]:
    """Rows of `stmt` (already scoped to the caller: start from `tenancy.scope`) after the cursor,
    and whether more follow."""
    if after is not None:
        cursor = session.scalar(stmt.with_only_columns(table.seq).where(table.id == after))
        if cursor is None:
            raise InvalidRequest(f"Invalid 'after': no object with id '{after}' in this list.", param="after")
        stmt = stmt.where(table.seq < cursor if descending else table.seq > cursor)
    stmt = stmt.order_by(table.seq.desc() if descending else table.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return rows[:limit], len(rows) > limit
