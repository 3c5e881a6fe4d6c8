"""Cursor pagination as OpenAI does it: ``after`` an id, ``limit`` items, ``has_more``."""

from __future__ import annotations

from sqlalchemy import Select, Table
from sqlalchemy.engine import Connection

from tunesmith.service.errors import bad_request, not_found

MAX_LIMIT = 10_000


def check_limit(limit: int | None, default: int = 20) -> int:
    """The page size to use; 400 for a limit outside 1..10000."""
    if limit is None:
        return default
    if limit < 1 or limit > MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_LIMIT}, got {limit}.", param="limit")
    return limit


def page(conn: Connection, table: Table, query: Select, *, after: str | None, limit: int,
         newest_first: bool = True, kind: str = "object") -> tuple[list, bool]:
    """Run ``query`` (already filtered to what the caller may see) one page at a time.

    Args:
        conn: an open connection.
        table: the table, with ``seq`` and ``id`` columns.
        query: a select over ``table``, filtered by project and the request's filters.
        after: the id of the last item of the previous page (must be visible under ``query``).
        limit: page size.
        newest_first: order by insertion, newest first (else oldest first).
        kind: the object's name, for the 404 on an unknown ``after``.

    Returns:
        the rows of this page and whether more follow.
    """
    if after is not None:
        cursor = conn.execute(query.with_only_columns(table.c.seq).where(table.c.id == after)).first()
        if cursor is None:
            raise not_found(kind, after, param="after")
        query = query.where(table.c.seq < cursor.seq if newest_first else table.c.seq > cursor.seq)
    query = query.order_by(table.c.seq.desc() if newest_first else table.c.seq.asc()).limit(limit + 1)
    rows = list(conn.execute(query))
    return rows[:limit], len(rows) > limit


def list_object(data: list, has_more: bool) -> dict:
    """OpenAI's list object."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
