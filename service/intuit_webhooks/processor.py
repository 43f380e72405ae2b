"""Turns stored notifications into `quickbooks.entity_changed` events, after Intuit was answered.

Every process that runs background work (service.worker) runs a processor: it LISTENs for stored notifications
(and looks anyway every BROKER_BACKGROUND_INTERVAL, for what a lost connection missed) and
claims unprocessed rows with SKIP LOCKED, so replicas share the work and never process one row
at once. A batch commits its events, its change keys and "processed" together: a replica killed
midway leaves its rows unprocessed, for the next pass of any replica. Nothing here calls a
remote party; the transactions hold database work only.

Duplicates: each entity change is keyed by (realm, entity, id, operation, time to the second);
a key seen before (an Intuit retry, the same change in the other format, a replayed
notification) is dropped. Keys are kept DEDUPE_WINDOW; a change older than that is dropped as
stale, so a replay is always either a known key or stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.aio import cancel_and_wait
from service.core.errors import database_unreachable
from service.core.listen import listen_forever
from service.events.outbox import QUICKBOOKS_ENTITY_CHANGED, emit
from service.intuit_webhooks import repository as repo
from service.intuit_webhooks.metrics import (
    ENTITY_CHANGES,
    NOTIFICATIONS_SET_ASIDE,
    PROCESSING_LAG,
)
from service.intuit_webhooks.payloads import EntityChange, parse
from service.intuit_webhooks.waker import CHANNEL
from service.store import connections

log = logging.getLogger(__name__)

DEDUPE_WINDOW = timedelta(days=7)
NOTIFICATION_RETENTION = timedelta(days=7)  # processed notifications, kept for inspection
MAX_ATTEMPTS = 5  # failed processing attempts before a notification is set aside
BATCH = 100
# After a wake-up, how long to let further notifications arrive before claiming: under load one
# transaction then takes many (Intuit's retries of one body arrive together, too).
GATHER_SECONDS = 0.02
_PRUNE_EVERY = timedelta(hours=1)


async def process_pending(
    sessionmaker: async_sessionmaker[AsyncSession], *, batch: int = BATCH
) -> Counter[str]:
    """Process unprocessed notifications until none is left (that no other replica holds);
    the entity changes by outcome."""
    total: Counter[str] = Counter()
    while True:
        try:
            claimed, outcomes = await _process_batch(sessionmaker, limit=batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if database_unreachable(exc):
                raise
            # One notification may be at fault: take them one at a time, setting aside any that
            # keeps failing, so it cannot hold up the others.
            log.exception("processing a batch of Intuit notifications failed; one at a time")
            claimed, outcomes = await _process_singly(sessionmaker, limit=batch)
        total.update(outcomes)
        if claimed < batch:
            return total


async def _process_batch(
    sessionmaker: async_sessionmaker[AsyncSession], *, limit: int
) -> tuple[int, Counter[str]]:
    async with sessionmaker() as session, session.begin():
        rows = await repo.claim(session, limit=limit)
        outcomes = await _process(session, rows)
    _observe(rows, outcomes)
    return len(rows), outcomes


async def _process_singly(
    sessionmaker: async_sessionmaker[AsyncSession], *, limit: int
) -> tuple[int, Counter[str]]:
    total: Counter[str] = Counter()
    for claimed in range(limit):
        rows: list[repo.Claimed] = []
        async with sessionmaker() as session:
            try:
                async with session.begin():
                    rows = await repo.claim(session, limit=1)
                    if not rows:
                        return claimed, total
                    outcomes = await _process(session, rows)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if database_unreachable(exc) or not rows:
                    raise
                await _failed(sessionmaker, rows[0], exc)
                continue
        _observe(rows, outcomes)
        total.update(outcomes)
    return limit, total


async def _failed(sessionmaker: async_sessionmaker[AsyncSession], row: repo.Claimed, exc: Exception) -> None:
    set_aside = row.attempts + 1 >= MAX_ATTEMPTS
    log.error(
        "Intuit notification %s failed to process (%s)%s",
        row.id,
        type(exc).__name__,
        "; set aside" if set_aside else "; retried later",
        exc_info=exc,
    )
    async with sessionmaker() as session, session.begin():
        await repo.record_failure(session, row.id, type(exc).__name__, set_aside=set_aside)
    if set_aside:
        NOTIFICATIONS_SET_ASIDE.inc()


async def _process(session: AsyncSession, rows: list[repo.Claimed]) -> Counter[str]:
    """Events for the claimed notifications' new changes, in this transaction."""
    now = datetime.now(UTC)
    parsed = [(row, parse(row.body)) for row in rows]
    found: list[tuple[int, EntityChange]] = []
    per_row: dict[int, Counter[str]] = {row.id: Counter(p.rejected) for row, p in parsed}
    for row, p in parsed:
        for change in p.changes:
            if change.occurred_at < now - DEDUPE_WINDOW:
                per_row[row.id]["stale"] += 1
            else:
                found.append((row.id, change))
    holders = await connections.live_connections(session, sorted({c.realm_id for _, c in found}))
    outcome_of = {c: "emitted" if c.realm_id in holders else "unknown_realm" for _, c in found}
    new = await repo.first_seen(session, found, outcome_of)
    for notification_id, change in found:
        key = (change.realm_id, change.entity, change.entity_id, change.operation, change.occurred_second)
        if key not in new:
            per_row[notification_id]["duplicate"] += 1
            continue
        new.discard(key)  # the same change twice in one notification: one event
        outcome = outcome_of[change]
        per_row[notification_id][outcome] += 1
        if outcome == "emitted":
            connection_id, tenant_id = holders[change.realm_id]
            await emit(
                session,
                QUICKBOOKS_ENTITY_CHANGED,
                tenant_id=tenant_id,
                connection_id=connection_id,
                data=_event_data(change),
            )
    await repo.mark_processed(session, {row.id: dict(per_row[row.id]) for row, _ in parsed})
    total: Counter[str] = Counter()
    for counts in per_row.values():
        total.update(counts)
    return total


def _event_data(change: EntityChange) -> dict[str, str]:
    data = {
        "realm_id": change.realm_id,
        "entity": change.entity,
        "entity_id": change.entity_id,
        "operation": change.operation,
        "occurred_at": change.occurred_at.isoformat().replace("+00:00", "Z"),
    }
    if change.deleted_id is not None:
        data["deleted_id"] = change.deleted_id
    return data


def _observe(rows: list[repo.Claimed], outcomes: Counter[str]) -> None:
    """Count what committed (not what a rolled-back attempt saw)."""
    now = datetime.now(UTC)
    for row in rows:
        PROCESSING_LAG.observe(max(0.0, (now - row.received_at).total_seconds()))
    for outcome, count in outcomes.items():
        ENTITY_CHANGES.labels(outcome).inc(count)


class NotificationProcessor:
    """Processes notifications as they are stored (NOTIFY) and every `poll_seconds` anyway."""

    def __init__(
        self,
        dsn: str,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        poll_seconds: float,
        retry_seconds: float = 2.0,
    ) -> None:
        self._dsn = dsn  # asyncpg's form (service.core.db.engine.asyncpg_dsn)
        self._sessionmaker = sessionmaker
        self._poll = poll_seconds
        self._retry = retry_seconds
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pruned_at: datetime | None = None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="qbo-broker-intuit-listen"),
            asyncio.create_task(self._work(), name="qbo-broker-intuit-process"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)

    async def _work(self) -> None:
        while True:
            self._wake.clear()
            try:
                await process_pending(self._sessionmaker)
                await self._prune_if_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if database_unreachable(exc):
                    log.warning("Intuit notifications wait: database unreachable (%s)", type(exc).__name__)
                else:
                    log.exception("processing Intuit notifications failed")
                await asyncio.sleep(self._retry)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            except TimeoutError:
                continue
            await asyncio.sleep(GATHER_SECONDS)

    async def _prune_if_due(self) -> None:
        now = datetime.now(UTC)
        if self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = now
        async with self._sessionmaker() as session, session.begin():
            # Keys a day past the window: a change that old is dropped as stale anyway.
            await repo.prune(
                session,
                changes_before=DEDUPE_WINDOW + timedelta(days=1),
                notifications_before=NOTIFICATION_RETENTION,
            )

    async def _listen(self) -> None:
        async def listening(_conn: asyncpg.Connection) -> None:
            self._wake.set()  # anything stored while not listening

        await listen_forever(
            self._dsn,
            {CHANNEL: lambda *_: self._wake.set()},
            name="the Intuit notification processor",
            retry_seconds=self._retry,
            on_listening=listening,
        )
