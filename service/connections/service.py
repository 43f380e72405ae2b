"""The rules for connections: creating, modules, disconnecting, deleting, the link status."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.callers import Caller
from service.connections.schemas import (
    AccountingLink,
    ConnectionOut,
    ConnectionStatusOut,
    LinkStatusOut,
    Modules,
    ModulesPatch,
    accounting_link,
    connection_out,
    owner_of,
)
from service.core.db.models import Connection
from service.core.errors import ConnectionLimitReached, NotConnected, NotFound
from service.domain import Status
from service.events import outbox
from service.runtime import Runtime
from service.store import connections as repo
from service.tokens import credentials
from service.tokens.revocation import revoke_after_commit


async def load_for_read(session: AsyncSession, caller: Caller, connection_id: uuid.UUID) -> Connection:
    conn = await repo.get_connection(session, connection_id)
    if conn is None:
        raise NotFound("No such connection.", connection_id=str(connection_id))
    caller.can_read(conn.tenant_id)
    return conn


async def load_for_write(session: AsyncSession, caller: Caller, connection_id: uuid.UUID) -> Connection:
    """The connection, row-locked for this transaction, if the caller may change it."""
    conn = await repo.get_connection(session, connection_id)
    if conn is None:
        raise NotFound("No such connection.", connection_id=str(connection_id))
    caller.can_write(conn.tenant_id)
    locked = await repo.get_connection(session, connection_id, for_update=True)
    if locked is None:
        raise NotFound("No such connection.", connection_id=str(connection_id))
    return locked


async def present(session: AsyncSession, conn: Connection) -> ConnectionOut:
    return connection_out(conn, await repo.get_pending_link(session, conn.id))


async def create(session: AsyncSession, *, tenant_id: str, caller: Caller, limit: int) -> Connection:
    """A new pending connection, unless the tenant has `limit` already. The tenant's lock, held
    until the transaction ends, makes concurrent creates count one after another."""
    await repo.lock_tenant(session, tenant_id)
    if await repo.count_tenant_connections(session, tenant_id) >= limit:
        raise ConnectionLimitReached(
            f"A tenant may have at most {limit} connections; delete one it no longer needs.", limit=limit
        )
    conn = await repo.create_connection(session, tenant_id=tenant_id)
    await repo.add_event(session, conn, "created", actor=caller.actor)
    return conn


async def change_modules(
    session: AsyncSession, conn: Connection, patch: ModulesPatch, *, caller: Caller
) -> None:
    changes = {}
    if patch.accounts_receivable is not None and patch.accounts_receivable != conn.module_ar:
        conn.module_ar = patch.accounts_receivable
        changes["accounts_receivable"] = patch.accounts_receivable
    if patch.accounts_payable is not None and patch.accounts_payable != conn.module_ap:
        conn.module_ap = patch.accounts_payable
        changes["accounts_payable"] = patch.accounts_payable
    if changes:
        conn.updated_at = datetime.now(UTC)
        await repo.add_event(session, conn, "modules_changed", actor=caller.actor, **changes)


async def disconnect(session: AsyncSession, rt: Runtime, conn: Connection, *, caller: Caller) -> None:
    """Wipe the tokens and remember the last owner; the revocation at Intuit is queued here and
    sent once this transaction has committed (a `revoked` event follows when Intuit confirms)."""
    if conn.status == Status.DISCONNECTED:
        return  # already done; disconnecting twice is not an error
    if conn.status == Status.PENDING:
        raise NotConnected(
            "The connection was never linked to QuickBooks.",
            connection_id=str(conn.id),
            connection_status=conn.status,
        )
    queued = False
    if conn.refresh_token is not None:
        revoke_after_commit(
            session,
            rt.sessionmaker,
            rt.intuit,
            rt.box,
            connection_id=conn.id,
            token=credentials.open_refresh_token(conn, rt.box),
            reason="disconnected",
        )
        queued = True
    pending = await repo.get_pending_link(session, conn.id, for_update=True)
    if pending is not None:
        revoke_after_commit(
            session,
            rt.sessionmaker,
            rt.intuit,
            rt.box,
            connection_id=conn.id,
            token=credentials.open_pending(pending, rt.box).refresh_token,
            reason="disconnected",
        )
        await session.delete(pending)
    now = datetime.now(UTC)
    credentials.wipe_tokens(conn)
    conn.status = Status.DISCONNECTED
    conn.disconnected_at = now
    conn.updated_at = now
    await repo.add_event(session, conn, "disconnected", actor=caller.actor, revocation_queued=queued or None)


async def delete(session: AsyncSession, rt: Runtime, conn: Connection, *, caller: Caller) -> None:
    if conn.status in (Status.CONNECTED, Status.REAUTHORIZATION_REQUIRED):
        await disconnect(session, rt, conn, caller=caller)
    else:
        pending = await repo.get_pending_link(session, conn.id, for_update=True)
        if pending is not None:
            revoke_after_commit(
                session,
                rt.sessionmaker,
                rt.intuit,
                rt.box,
                connection_id=conn.id,
                token=credentials.open_pending(pending, rt.box).refresh_token,
                reason="deleted",
            )
    await outbox.emit_for_connection(session, outbox.CONNECTION_DELETED, conn)
    await session.flush()  # the disconnect's own changes first (its pending link, its event)
    # Through the ORM, so the commit drops the connection from this replica's caches at once.
    await session.delete(conn)
    await session.flush()


async def link_status_body(rt: Runtime, tenant_id: str) -> bytes:
    """GET /status's answer for a tenant, as JSON (cached; concurrent misses share one read)."""

    async def load() -> bytes:
        # Creation stops at the cap; should the cap be lowered, the answer stays bounded.
        connections = await repo.read_tenant_status(
            rt.pool, tenant_id, limit=rt.settings.max_connections_per_tenant
        )
        items = [
            ConnectionStatusOut(
                id=c.id,
                status=Status(c.status),
                realm_id=c.realm_id,
                company_name=c.company_name,
                owner=owner_of(c),
                modules=Modules(accounts_receivable=c.module_ar, accounts_payable=c.module_ap),
                accounting_link=accounting_link(c),
                access_token_expires_at=c.access_token_expires_at,
            )
            for c in connections
        ]
        overall = (
            AccountingLink.ENABLED
            if any(i.accounting_link == AccountingLink.ENABLED for i in items)
            else AccountingLink.DISABLED
        )
        return (
            LinkStatusOut(tenant_id=tenant_id, accounting_link=overall, connections=items)
            .model_dump_json()
            .encode()
        )

    body = await rt.caches.status.get_or_load(tenant_id, load)
    assert body is not None  # a tenant without connections has a status too
    return body
