"""Background work in every replica: keep links alive, expire pending links, retry revocations.

Replicas share the work through PostgreSQL: a due connection whose refresh lock (or row) another
replica holds is skipped, and the one that refreshes re-checks under the lock that it is still
due, so none is refreshed twice, and a killed replica leaves nothing locked.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from service.connections import repository as repo
from service.db.models import Connection, PendingLink
from service.errors import ProblemError
from service.metrics import BACKGROUND_RUNS
from service.oauth.flows import discard_pending_link, expire_held_grants
from service.runtime import Runtime
from service.tasks import cancel_and_wait
from service.tokens.revocation import retry_pending_revocations

log = logging.getLogger(__name__)

C = Connection.__table__.c  # type: ignore[attr-defined]
P = PendingLink.__table__.c  # type: ignore[attr-defined]
ACCESS_TOKEN_LEAD = timedelta(minutes=10)


class BackgroundWorker:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="qbo-broker-background")

    async def stop(self) -> None:
        self._stopping.set()
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        interval = self._rt.settings.background_interval_seconds
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background pass failed")
                BACKGROUND_RUNS.labels("pass", "error").inc()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def run_once(self) -> dict[str, int]:
        return {
            "refreshed": await keep_alive(self._rt),
            "pending_links_expired": await expire_pending_links(self._rt),
            "completion_tickets_expired": await expire_held_grants(self._rt),
            "revocations": await retry_pending_revocations(self._rt.sessionmaker, self._rt.intuit,
                                                           self._rt.box),
        }


def due_connections_query(*, now: datetime, include_access: bool, limit: int) -> sa.Select:  # type: ignore[type-arg]
    """Connections whose refresh token is old or near its end (or, optionally, whose access
    token is about to expire). Each branch is served by a partial index on connected rows."""
    # 'connected' as a literal, not a parameter: a generic plan could not use the partial indexes.
    connected = sa.text("status = 'connected'")
    keepalive = (sa.select(C.id).where(connected, C.keepalive_due_at <= now)
                 .order_by(C.keepalive_due_at).limit(limit))
    if not include_access:
        return keepalive
    access = (sa.select(C.id).where(connected, C.access_token_expires_at <= now + ACCESS_TOKEN_LEAD)
              .order_by(C.access_token_expires_at).limit(limit))
    return sa.union(keepalive, access).limit(limit)  # type: ignore[return-value]


async def keep_alive(rt: Runtime, *, limit: int = 500) -> int:
    """Refresh due connections with bounded concurrency. The refresh itself takes the
    connection's lock and re-checks, so one another replica just refreshed is not refreshed
    again."""
    async with rt.sessionmaker() as session:
        ids: list[uuid.UUID] = list((await session.execute(due_connections_query(
            now=datetime.now(UTC), include_access=rt.settings.keepalive_refresh_access_tokens,
            limit=limit))).scalars())
    if not ids:
        return 0
    gate = asyncio.Semaphore(rt.settings.keepalive_concurrency)
    refreshed = 0

    async def one(connection_id: uuid.UUID) -> None:
        nonlocal refreshed
        async with gate:
            try:
                if await rt.refresher.keep_alive(connection_id):
                    refreshed += 1
                    BACKGROUND_RUNS.labels("keepalive", "refreshed").inc()
            except ProblemError as exc:
                BACKGROUND_RUNS.labels("keepalive", exc.code).inc()

    await asyncio.gather(*(one(i) for i in ids))
    return refreshed


async def expire_pending_links(rt: Runtime, *, batch: int = 50) -> int:
    """Pending links older than 10 minutes: revoke their grants at Intuit and discard them."""
    async with rt.sessionmaker() as session, session.begin():
        rows = list((await session.execute(
            sa.select(PendingLink).where(P.expires_at <= sa.func.now()).limit(batch)
            .with_for_update(skip_locked=True))).scalars())
        for pending in rows:
            conn = await repo.get_connection(session, pending.connection_id, for_update=True)
            if conn is None:
                continue  # deleted meanwhile; the cascade removes the pending link
            await discard_pending_link(session, rt, conn, pending, event="pending_link_expired",
                                       actor="broker")
            BACKGROUND_RUNS.labels("pending_link", "expired").inc()
    return len(rows)
