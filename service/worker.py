"""Background work: keep links alive, expire pending links and completion tickets, send the
revocation outbox, turn Intuit's notifications into events (service.intuit_webhooks.processor,
woken as they are stored), deliver webhooks (service.events.delivery, woken by each event).
It runs inside every `serve` process (unless BROKER_BACKGROUND_ENABLED=false), or alone as
`qbo-broker worker` (run_worker).

Replicas share the work through PostgreSQL: a due connection whose refresh lock (or row) another
replica holds is skipped, and the one that refreshes re-checks under the lock that it is still
due, so none is refreshed twice, and a killed replica leaves nothing locked.

One row cannot stop the rest: rows sealed under an encryption key this process lacks are left
for a replica that has it (and reported each pass), and a row that fails otherwise is logged by
id, counted in qbo_broker_background_row_errors_total and retried on a later pass, while the
other rows and tasks go on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.core.aio import cancel_and_wait
from service.core.config import Settings
from service.core.crypto import DecryptionError, printable_key_id
from service.core.db.engine import asyncpg_dsn, transaction
from service.core.db.models import PendingLink
from service.core.errors import ProblemError
from service.core.metrics import BACKGROUND_ROW_ERRORS, BACKGROUND_RUNS
from service.events.delivery import WebhookSender
from service.intuit_webhooks.processor import NotificationProcessor
from service.oauth.flows import discard_pending_link, expire_held_grants
from service.runtime import Runtime, build_runtime
from service.store import connections as repo
from service.tokens.revocation import retry_pending_revocations

log = logging.getLogger(__name__)

# Keep-alive with access tokens too: those that expire within this.
ACCESS_TOKEN_LEAD = timedelta(minutes=10)


async def run_worker(settings: Settings, stop: asyncio.Event, *, database_url: str | None = None) -> None:
    """The background work alone, without serving HTTP, until `stop` is set."""
    async with build_runtime(settings, database_url=database_url) as runtime:
        worker = BackgroundWorker(runtime)
        worker.start()
        log.info("worker started")
        try:
            await stop.wait()
        finally:
            await worker.stop()
            log.info("worker stopped")


class BackgroundWorker:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._notifications = NotificationProcessor(
            asyncpg_dsn(runtime.database_url),
            runtime.sessionmaker,
            poll_seconds=runtime.settings.background_interval_seconds,
        )

        # Webhooks go out from a task of their own, woken by each event's commit rather than on
        # this worker's interval.
        self._sender = (
            WebhookSender(runtime.settings, runtime.pool, runtime.box, dsn=asyncpg_dsn(runtime.database_url))
            if runtime.settings.webhook_delivery_enabled
            else None
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="qbo-broker-background")
        self._notifications.start()
        if self._sender is not None:
            self._sender.start()

    async def stop(self) -> None:
        self._stopping.set()
        await self._notifications.stop()
        await cancel_and_wait(self._task)
        if self._sender is not None:
            await self._sender.stop()

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
        """One pass. Each task runs whatever the others do: a failing one is logged and counted
        (task "pass", outcome "error"), and the next task runs."""
        rt = self._rt
        tasks: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("refreshed", lambda: keep_alive(rt)),
            ("pending_links_expired", lambda: expire_pending_links(rt)),
            ("completion_tickets_expired", lambda: expire_held_grants(rt)),
            ("revocations", lambda: retry_pending_revocations(rt.sessionmaker, rt.intuit, rt.box)),
            ("unknown_key_rows", lambda: report_unknown_keys(rt)),
        ]
        done: dict[str, int] = {}
        for name, task in tasks:
            try:
                done[name] = await task()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s failed", name)
                BACKGROUND_RUNS.labels("pass", "error").inc()
        return done


def _row_failed(task: str, row_id: object, exc: Exception) -> None:
    """Log (by id and error type only: no secret is in either) and count one row's failure."""
    reason = "undecryptable" if isinstance(exc, DecryptionError) else "error"
    log.error("background %s of %s failed (%s); retried on a later pass", task, row_id, type(exc).__name__)
    BACKGROUND_ROW_ERRORS.labels(task, reason).inc()


async def keep_alive(rt: Runtime, *, limit: int = 500) -> int:
    """Refresh due connections with bounded concurrency. The refresh itself takes the
    connection's lock and re-checks, so one another replica just refreshed is not refreshed
    again."""
    now = datetime.now(UTC)
    async with rt.sessionmaker() as session:
        ids = await repo.due_connections(
            session,
            now=now,
            access_by=now + ACCESS_TOKEN_LEAD if rt.settings.keepalive_refresh_access_tokens else None,
            limit=limit,
            key_ids=rt.box.key_ids,
        )
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
            except Exception as exc:  # this connection's; the others go on
                _row_failed("keepalive", connection_id, exc)

    await asyncio.gather(*(one(i) for i in ids))
    return refreshed


async def expire_pending_links(rt: Runtime, *, batch: int = 50) -> int:
    """Pending links older than 10 minutes: revoke their grants at Intuit and discard them.
    Each in a savepoint of its own: one that fails is left as it was for a later pass, and the
    pass goes on past it (in expiry order, batch by batch)."""
    expired = 0
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        async with transaction(rt.sessionmaker) as session:
            rows = await repo.expired_pending_links(session, key_ids=rt.box.key_ids, after=after, limit=batch)
            for pending in rows:
                if await _expire_one(session, rt, pending):
                    expired += 1
        if len(rows) < batch:
            return expired
        after = (rows[-1].expires_at, rows[-1].connection_id)


async def _expire_one(session: AsyncSession, rt: Runtime, pending: PendingLink) -> bool:
    connection_id = pending.connection_id
    try:
        async with session.begin_nested():
            conn = await repo.get_connection(session, connection_id, for_update=True)
            if conn is None:
                return False  # deleted meanwhile; the cascade removes the pending link
            await discard_pending_link(
                session, rt, conn, pending, event="pending_link_expired", actor="broker"
            )
    except Exception as exc:
        _row_failed("pending_link", connection_id, exc)
        return False
    BACKGROUND_RUNS.labels("pending_link", "expired").inc()
    return True


async def report_unknown_keys(rt: Runtime) -> int:
    """Count (and log, by key id) the due rows this process left alone because they are sealed
    under a key it lacks. A replica configured with that key does them."""
    async with rt.sessionmaker() as session:
        rows = await repo.due_under_unknown_keys(session, rt.box.key_ids)
    total = 0
    for task, kid, count in rows:
        total += count
        BACKGROUND_ROW_ERRORS.labels(task, "unknown_key").inc(count)
        log.error(
            "%d due %s rows are sealed under encryption key id %r, which "
            "BROKER_ENCRYPTION_KEYS here lacks; left for a replica that has it",
            count,
            task,
            printable_key_id(kid),
        )
    return total
