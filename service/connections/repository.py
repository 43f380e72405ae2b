"""All SQL about connections, pending links, events and QuickBooks user claims."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.db.locking import TENANT_LOCK_NAMESPACE
from service.core.db.models import Connection, ConnectionEvent, PendingLink, QuickBooksUserClaim
from service.core.errors import ValidationFailed

C = Connection.__table__.c  # type: ignore[attr-defined]
P = PendingLink.__table__.c  # type: ignore[attr-defined]
E = ConnectionEvent.__table__.c  # type: ignore[attr-defined]


def _bad_cursor() -> ValidationFailed:
    return ValidationFailed("The cursor is not valid.", errors=[
        {"loc": ["query", "cursor"], "msg": "not a cursor from this API", "type": "value_error"}])


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode().rstrip("=")


_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,200}")
_EVENT_ID = re.compile(r"[1-9][0-9]{0,18}")
_BIGINT_MAX = 2**63 - 1


def decode_cursor(cursor: str, count: int) -> list[str]:
    """The parts of a cursor this API issued. Anything else (non-ASCII, bad base64, a cursor
    that is not in the exact form encode_cursor writes) is a ValidationFailed, never a 500."""
    if not _CURSOR_TEXT.fullmatch(cursor):
        raise _bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise _bad_cursor() from None
    parts = raw.split("|")
    if len(parts) != count or encode_cursor(*parts) != cursor:
        raise _bad_cursor()
    return parts


def _connection_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    created, ident = decode_cursor(cursor, 2)
    try:
        after = (datetime.fromisoformat(created), uuid.UUID(ident))
    except ValueError:
        raise _bad_cursor() from None
    # Exactly as encode_cursor wrote it: a UTC timestamp and a canonical id.
    if (after[0].utcoffset() != timedelta(0) or after[0].isoformat() != created
            or str(after[1]) != ident):
        raise _bad_cursor()
    return after


def _event_cursor(cursor: str) -> int:
    (before,) = decode_cursor(cursor, 1)
    if not _EVENT_ID.fullmatch(before) or int(before) > _BIGINT_MAX:
        raise _bad_cursor()
    return int(before)


async def lock_tenant(session: AsyncSession, tenant_id: str) -> None:
    """Serialize this transaction with others that lock the tenant, until it ends."""
    await session.execute(sa.select(sa.func.pg_advisory_xact_lock(
        sa.literal(TENANT_LOCK_NAMESPACE, sa.Integer), sa.func.hashtext(tenant_id))))


async def count_tenant_connections(session: AsyncSession, tenant_id: str) -> int:
    stmt = sa.select(sa.func.count()).select_from(Connection).where(C.tenant_id == tenant_id)
    return int((await session.execute(stmt)).scalar_one())


async def create_connection(session: AsyncSession, *, tenant_id: str) -> Connection:
    conn = Connection(tenant_id=tenant_id)
    session.add(conn)
    await session.flush()
    return conn


async def get_connection(session: AsyncSession, connection_id: uuid.UUID, *,
                         for_update: bool = False) -> Connection | None:
    stmt = sa.select(Connection).where(C.id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_pending_link(session: AsyncSession, connection_id: uuid.UUID, *,
                           for_update: bool = False) -> PendingLink | None:
    stmt = sa.select(PendingLink).where(P.connection_id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_connections(
    session: AsyncSession, *, tenant_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[tuple[Connection, PendingLink | None]], str | None]:
    stmt = (sa.select(Connection, PendingLink)
            .outerjoin(PendingLink, P.connection_id == C.id)
            .where(C.tenant_id == tenant_id)
            .order_by(C.created_at.desc(), C.id.desc())
            .limit(limit + 1))
    if status is not None:
        stmt = stmt.where(C.status == status)
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(C.created_at, C.id) < sa.tuple_(*_connection_cursor(cursor)))
    rows: list[tuple[Connection, PendingLink | None]] = [
        (row[0], row[1]) for row in (await session.execute(stmt)).all()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1][0]
        next_cursor = encode_cursor(last.created_at.isoformat(), str(last.id))
    return rows, next_cursor


# The link icon's read goes straight to asyncpg, one statement in autocommit: no session, no
# transaction, no ORM, on cache misses only (the token endpoint's is service.tokens.refresh's).
_STATUS_SQL = """
SELECT id, status, realm_id, company_name, owner_user_id, owner_qb_sub, owner_qb_email,
       owner_qb_name, module_ar, module_ap, access_token_expires_at
FROM connections WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2
"""


async def read_tenant_status(reads: asyncpg.Pool, tenant_id: str, *,
                             limit: int) -> list[SimpleNamespace]:
    """The link-status columns of a tenant's newest `limit` connections."""
    return [SimpleNamespace(**row) for row in await reads.fetch(_STATUS_SQL, tenant_id, limit)]


async def realm_linked_elsewhere(session: AsyncSession, *, realm_id: str,
                                 connection_id: uuid.UUID) -> bool:
    stmt = sa.select(sa.exists().where(
        C.realm_id == realm_id, C.id != connection_id,
        C.status.in_(("connected", "reauthorization_required"))))
    return bool((await session.execute(stmt)).scalar_one())


async def claimed_by(session: AsyncSession, *, tenant_id: str, qb_sub: str) -> str | None:
    stmt = sa.select(QuickBooksUserClaim.user_id).where(  # type: ignore[call-overload]
        QuickBooksUserClaim.tenant_id == tenant_id, QuickBooksUserClaim.qb_sub == qb_sub)
    return (await session.execute(stmt)).scalar_one_or_none()


async def claim_quickbooks_user(session: AsyncSession, *, tenant_id: str, qb_sub: str,
                                user_id: str) -> None:
    await session.execute(
        pg_insert(QuickBooksUserClaim)
        .values(tenant_id=tenant_id, qb_sub=qb_sub, user_id=user_id)
        .on_conflict_do_nothing()
    )


async def add_event(session: AsyncSession, conn: Connection, type_: str, *,
                    actor: str | None, **details: Any) -> None:
    session.add(ConnectionEvent(connection_id=conn.id, tenant_id=conn.tenant_id, type=type_,
                                actor=actor, details={k: v for k, v in details.items()
                                                      if v is not None}))


async def list_events(session: AsyncSession, *, connection_id: uuid.UUID, limit: int,
                      cursor: str | None) -> tuple[list[ConnectionEvent], str | None]:
    # refresh_attempt rows are the refresher's bookkeeping (service.tokens.refresh), not history.
    stmt = (sa.select(ConnectionEvent)
            .where(E.connection_id == connection_id, E.type != "refresh_attempt")
            .order_by(E.id.desc()).limit(limit + 1))
    if cursor is not None:
        stmt = stmt.where(E.id < _event_cursor(cursor))
    events = list((await session.execute(stmt)).scalars())
    next_cursor = None
    if len(events) > limit:
        events = events[:limit]
        next_cursor = encode_cursor(str(events[-1].id))
    return events, next_cursor


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(sa.select(C.status, sa.func.count()).group_by(C.status))
    return {status: count for status, count in rows.all()}
