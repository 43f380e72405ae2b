"""Page cursors: opaque to callers, and refused with 422 unless exactly as this API wrote them."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from service.core.errors import ValidationFailed


def bad_cursor() -> ValidationFailed:
    return ValidationFailed(
        "The cursor is not valid.",
        errors=[{"loc": ["query", "cursor"], "msg": "not a cursor from this API", "type": "value_error"}],
    )


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode().rstrip("=")


_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,200}")
_ROW_ID = re.compile(r"[1-9][0-9]{0,18}")
_BIGINT_MAX = 2**63 - 1


def decode_cursor(cursor: str, count: int) -> list[str]:
    """The parts of a cursor this API issued. Anything else (non-ASCII, bad base64, a cursor
    that is not in the exact form encode_cursor writes) is a ValidationFailed, never a 500."""
    if not _CURSOR_TEXT.fullmatch(cursor):
        raise bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise bad_cursor() from None
    parts = raw.split("|")
    if len(parts) != count or encode_cursor(*parts) != cursor:
        raise bad_cursor()
    return parts


def time_id_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """(created_at, id) of the last row of the previous page, as encode_cursor wrote them."""
    created, ident = decode_cursor(cursor, 2)
    try:
        after = (datetime.fromisoformat(created), uuid.UUID(ident))
    except ValueError:
        raise bad_cursor() from None
    # Exactly as encode_cursor wrote it: a UTC timestamp and a canonical id.
    if after[0].utcoffset() != timedelta(0) or after[0].isoformat() != created or str(after[1]) != ident:
        raise bad_cursor()
    return after


def id_cursor(cursor: str) -> int:
    """The id of the last row of the previous page (a bigint), as encode_cursor wrote it."""
    (before,) = decode_cursor(cursor, 1)
    if not _ROW_ID.fullmatch(before) or int(before) > _BIGINT_MAX:
        raise bad_cursor()
    return int(before)


class _Stamped(Protocol):
    created_at: datetime
    id: uuid.UUID


T = TypeVar("T")


def time_id_of(row: _Stamped) -> tuple[str, ...]:
    """The cursor parts of a row ordered by (created_at, id), as time_id_cursor reads them."""
    return row.created_at.isoformat(), str(row.id)


def page(rows: list[T], limit: int, cursor_of: Callable[[T], tuple[str, ...]]) -> tuple[list[T], str | None]:
    """A page from up to `limit + 1` rows read in order: the first `limit`, and the cursor of the
    last of them when there are more (else None)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(*cursor_of(rows[-1]))
