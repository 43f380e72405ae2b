"""All SQL about connections, pending links, events and QuickBooks user claims."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.db.locking import TENANT_LOCK_NAMESPACE
from service.core.db.models import Connection, ConnectionEvent, PendingLink, QuickBooksUserClaim
from service.core.pagination import id_cursor, page, time_id_cursor, time_id_of
from service.events import outbox

C = Connection.__table__.c  # type: ignore[attr-defined]
P = PendingLink.__table__.c  # type: ignore[attr-defined]
E = ConnectionEvent.__table__.c  # type: ignore[attr-defined]


async def lock_tenant(session: AsyncSession, tenant_id: str) -> None:
    """Serialize this transaction with others that lock the tenant, until it ends."""
    await session.execute(
        sa.select(
            sa.func.pg_advisory_xact_lock(
                sa.literal(TENANT_LOCK_NAMESPACE, sa.Integer), sa.func.hashtext(tenant_id)
            )
        )
    )


async def count_tenant_connections(session: AsyncSession, tenant_id: str) -> int:
    stmt = sa.select(sa.func.count()).select_from(Connection).where(C.tenant_id == tenant_id)
    return int((await session.execute(stmt)).scalar_one())


async def create_connection(session: AsyncSession, *, tenant_id: str) -> Connection:
    conn = Connection(tenant_id=tenant_id)
    session.add(conn)
    await session.flush()
    return conn


async def get_connection(
    session: AsyncSession, connection_id: uuid.UUID, *, for_update: bool = False
) -> Connection | None:
    stmt = sa.select(Connection).where(C.id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_pending_link(
    session: AsyncSession, connection_id: uuid.UUID, *, for_update: bool = False
) -> PendingLink | None:
    stmt = sa.select(PendingLink).where(P.connection_id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_connections(
    session: AsyncSession, *, tenant_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[tuple[Connection, PendingLink | None]], str | None]:
    stmt = (
        sa.select(Connection, PendingLink)
        .outerjoin(PendingLink, P.connection_id == C.id)
        .where(C.tenant_id == tenant_id)
        .order_by(C.created_at.desc(), C.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        stmt = stmt.where(C.status == status)
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(C.created_at, C.id) < sa.tuple_(*time_id_cursor(cursor)))
    rows: list[tuple[Connection, PendingLink | None]] = [
        (row[0], row[1]) for row in (await session.execute(stmt)).all()
    ]
    return page(rows, limit, lambda row: time_id_of(row[0]))


# The link icon's read goes straight to asyncpg, one statement in autocommit: no session, no
# transaction, no ORM, on cache misses only (the token endpoint's is service.tokens.refresh's).
_STATUS_SQL = """
SELECT id, status, realm_id, company_name, owner_user_id, owner_qb_sub, owner_qb_email,
       owner_qb_name, module_ar, module_ap, access_token_expires_at
FROM connections WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2
"""


async def read_tenant_status(reads: asyncpg.Pool, tenant_id: str, *, limit: int) -> list[SimpleNamespace]:
    """The link-status columns of a tenant's newest `limit` connections."""
    return [SimpleNamespace(**row) for row in await reads.fetch(_STATUS_SQL, tenant_id, limit)]


async def realm_linked_elsewhere(session: AsyncSession, *, realm_id: str, connection_id: uuid.UUID) -> bool:
    stmt = sa.select(
        sa.exists().where(
            C.realm_id == realm_id,
            C.id != connection_id,
            C.status.in_(("connected", "reauthorization_required")),
        )
    )
    return bool((await session.execute(stmt)).scalar_one())


async def claimed_by(session: AsyncSession, *, tenant_id: str, qb_sub: str) -> str | None:
    stmt = sa.select(QuickBooksUserClaim.user_id).where(  # type: ignore[call-overload]
        QuickBooksUserClaim.tenant_id == tenant_id, QuickBooksUserClaim.qb_sub == qb_sub
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def claim_quickbooks_user(session: AsyncSession, *, tenant_id: str, qb_sub: str, user_id: str) -> None:
    await session.execute(
        pg_insert(QuickBooksUserClaim)
        .values(tenant_id=tenant_id, qb_sub=qb_sub, user_id=user_id)
        .on_conflict_do_nothing()
    )


async def add_event(
    session: AsyncSession, conn: Connection, type_: str, *, actor: str | None, **details: Any
) -> None:
    """Record a change in the connection's audit trail and, for the public kinds, publish its
    event (service.events.outbox), both in the change's transaction."""
    kept = {k: v for k, v in details.items() if v is not None}
    session.add(
        ConnectionEvent(
            connection_id=conn.id, tenant_id=conn.tenant_id, type=type_, actor=actor, details=kept
        )
    )
    public = outbox.public_event(type_, conn, kept)
    if public is not None:
        await outbox.emit(session, public[0], tenant_id=conn.tenant_id, connection_id=conn.id, data=public[1])


async def list_events(
    session: AsyncSession, *, connection_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[ConnectionEvent], str | None]:
    stmt = (
        sa.select(ConnectionEvent)
        .where(E.connection_id == connection_id)
        .order_by(E.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        stmt = stmt.where(E.id < id_cursor(cursor))
    events = list((await session.execute(stmt)).scalars())
    return page(events, limit, lambda event: (str(event.id),))


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(sa.select(C.status, sa.func.count()).group_by(C.status))
    return {status: count for status, count in rows.all()}
