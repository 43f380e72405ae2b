"""Fresh access tokens, refreshed once per expiry however many callers and replicas ask.

Two layers. Inside a process, concurrent callers for one connection share one refresh (a task
per connection), so waiters hold nothing. Across processes, a refresh runs under the
connection's advisory lock (service.tokens.locks), held on a session of its own from before the
row is re-read until the outcome is committed; a process that finds the lock taken waits for
the holder's commit (its change notification; a slow poll is only a safety net) and reads the
new token from the row instead of spending the dead refresh token. It holds no refresh slot and
no pooled connection while it waits. A killed process releases its locks at once.

No pooled connection waits on Intuit. A refresh is three steps, each one statement on the asyncpg
pool (service.store.connections):
1. one statement under the row lock (so a writer of the row, such as a disconnect, is done
   first): re-read the row, decide, and record a refresh attempt (table refresh_attempts) if a
   refresh is due (the decisions of refreshes that come at once go in one statement, as do
   reads of rows);
2. the call to Intuit, holding no database connection;
3. one statement that stores the outcome (new tokens above all) if the row still holds the
   refresh token that was sent, settles the attempt records and logs the event. If the row
   changed meanwhile (a disconnect, a new link), its new state stands, and the refresh looks again.
   The new tokens of refreshes whose answers come at once go in one statement too.

The refresh attempt record is what a killed process cannot take back: Intuit may have rotated
the stored token for an answer that never arrived. A record left behind means "a refresh with
the stored token may have reached Intuit": a later `invalid_grant` is then reported as
`refresh_token_lost` (and counted), not blamed on a disconnect in QuickBooks.

This module is the protocol (single flight, locks, waits, the three steps); storing an outcome
is service.tokens.outcome's, and the token endpoint's read model service.tokens.view's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from service.core.aio import shared
from service.core.cache import Caches, Watch
from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.errors import IntuitUnavailableProblem, NotFound
from service.core.observability import request_id_var
from service.domain import Status
from service.intuit.client import IntuitClient, TokenSet
from service.intuit.errors import IntuitError
from service.store import connections as store
from service.store.connections import ConnectionRow, DecisionRow
from service.tokens import credentials
from service.tokens.gathered import Batch, Gathered, columns
from service.tokens.locks import Hold, RefreshLocks
from service.tokens.outcome import Outcomes
from service.tokens.view import MIN_VALIDITY, AccessToken, ConnectionView, fresh_enough, usable_or_raise

log = logging.getLogger(__name__)
# Per-request refresh timings at DEBUG, for bench/refresh_storm.py: off unless a logging
# configuration turns this logger on, and then one line per request that waited on a refresh.
timeline_log = logging.getLogger("qbo_broker.refresh_timeline")

# How long a process waits for another one's refresh before it looks at the row again. The
# holder's commit is notified (service.core.cache.ChangeFeed) and ends the wait within milliseconds;
# the timeout is a safety net, short only while the change feed is down.
SAFETY_POLL_SECONDS = 2.0
WAIT_POLL_SECONDS = 0.2  # while changes are not being notified
# Times a refresh starts over because the row changed under it, before it gives up.
MAX_ROUNDS = 3


class _Timed(Protocol):
    """What _Due reads of a connection."""

    @property
    def access_token(self) -> str | None: ...
    @property
    def access_token_expires_at(self) -> datetime | None: ...
    @property
    def last_refreshed_at(self) -> datetime | None: ...
    @property
    def keepalive_due_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class _Due:
    """When a connection needs a refresh, as of one moment. The same test runs in Python on a
    row that was read (`__call__`) and in SQL under the row lock (service.store.connections)."""

    valid_until: datetime | None = None  # the access token must be valid at least until then
    refreshed_after: datetime | None = None  # a refresh must have happened after this
    keepalive_by: datetime | None = None  # keepalive_due_at this or earlier

    def __call__(self, conn: _Timed) -> bool:
        if self.valid_until is not None and (
            conn.access_token is None
            or conn.access_token_expires_at is None
            or conn.access_token_expires_at < self.valid_until
        ):
            return True
        if self.refreshed_after is not None and (
            conn.last_refreshed_at is None or conn.last_refreshed_at < self.refreshed_after
        ):
            return True
        return (
            self.keepalive_by is not None
            and conn.keepalive_due_at is not None
            and conn.keepalive_due_at <= self.keepalive_by
        )

    def args(self) -> tuple[datetime | None, datetime | None, datetime | None]:
        return self.valid_until, self.refreshed_after, self.keepalive_by


# What is due as of a moment (the rule of one kind of refresh).
_Needed = Callable[[datetime], _Due]
# Given a connection id: an async context whose value tells when the row changes
# (service.core.cache.ChangeFeed.watching); None: poll.
Watching = Callable[[str], AbstractAsyncContextManager[Watch]]


class _LockLost(Exception):
    """The lock session was lost before the refresh token left: take the lock again."""


class Timeline:
    """When a refresh passed each point: (phase that just ended, time.monotonic()). The clock is
    CLOCK_MONOTONIC, one for every process on a host, so a benchmark can line the marks up with
    its own. A disabled timeline (the default) records nothing."""

    __slots__ = ("marks",)

    def __init__(self, enabled: bool = True) -> None:
        self.marks: list[tuple[str, float]] | None = [("start", time.monotonic())] if enabled else None

    def mark(self, phase: str) -> None:
        if self.marks is not None:
            self.marks.append((phase, time.monotonic()))


_OFF = Timeline(enabled=False)
# When this request began reading its connection (a cache miss), for its timeline.
_view_began: ContextVar[float | None] = ContextVar("qbo_broker_view_began", default=None)


@asynccontextmanager
async def _no_watch(_connection_id: str) -> AsyncIterator[Watch]:
    yield Watch(None)  # never set: waiting always polls


class TokenRefresher:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        intuit: IntuitClient,
        box: SecretBox,
        locks: RefreshLocks,
        caches: Caches,
        *,
        watch: Watching | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._intuit = intuit
        self._box = box
        self._locks = locks
        self._caches = caches
        self._watch = watch or _no_watch
        self._outcomes = Outcomes(settings, pool, box, caches)

        def decide(batch: Batch, *, skip_locked: bool = False) -> Awaitable[list[DecisionRow]]:
            return store.decide(pool, *columns(batch), skip_locked=skip_locked)

        self._read: Gathered[ConnectionRow] = Gathered(
            lambda batch: store.read_rows(pool, [cid for cid, _ in batch]), "qbo-broker-reads"
        )
        self._decide: Gathered[DecisionRow] = Gathered(decide, "qbo-broker-decisions")
        self._decide_or_skip: Gathered[DecisionRow] = Gathered(
            lambda batch: decide(batch, skip_locked=True), "qbo-broker-decisions"
        )
        # One refresh task per connection and purpose ("request", "forced", "keepalive"): callers
        # join the one that decides by their own rule.
        self._inflight: dict[tuple[uuid.UUID, str], asyncio.Task[tuple[AccessToken | None, bool]]] = {}
        # The running refreshes' timelines, while the timeline log is on.
        self._timelines: dict[tuple[uuid.UUID, str], Timeline] = {}
        # Refreshes this process runs at once (each one call to Intuit at a time).
        self._slots = asyncio.Semaphore(settings.refresh_concurrency)
        # How long to wait for another process's refresh: as long as one may take at Intuit.
        self._wait_limit = (
            settings.intuit_timeout_seconds * settings.intuit_max_attempts
            + settings.intuit_backoff_max_seconds * settings.intuit_max_attempts
            + 5.0
        )
        self._closing = False

    async def aclose(self, grace_seconds: float = 30.0) -> None:
        """Start no more refreshes, and let those under way store their outcome (they hold
        new tokens that exist nowhere else) before the pool, the locks and the client close."""
        self._closing = True
        running = list(self._inflight.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace_seconds)
            if late:
                log.error("shutdown: %d refreshes still running after %.0f s", len(late), grace_seconds)

    async def view(self, connection_id: uuid.UUID) -> ConnectionView | None:
        """The connection as the token endpoint needs it (cached; None: no such connection)."""
        if timeline_log.isEnabledFor(logging.DEBUG):
            _view_began.set(time.monotonic())

        async def load() -> ConnectionView | None:
            row = await self._read(connection_id)
            return None if row is None else ConnectionView.of(row, self._box)

        return await self._caches.connections.get_or_load(str(connection_id), load)

    def _token_of(self, conn: ConnectionRow | DecisionRow) -> AccessToken:
        assert conn.access_token_expires_at is not None and conn.realm_id is not None
        return AccessToken(
            access_token=credentials.open_access_token(conn, self._box),
            expires_at=conn.access_token_expires_at,
            realm_id=conn.realm_id,
        )

    @staticmethod
    def fresh_token(conn: ConnectionView) -> AccessToken | None:
        """The view's own token if the connection is usable and the token fresh enough; None
        when access_token() would have to refresh (or refuse)."""
        if (
            conn.status != Status.CONNECTED
            or not conn.refresh_token
            or not fresh_enough(conn, datetime.now(UTC))
        ):
            return None
        assert conn.access_token and conn.access_token_expires_at and conn.realm_id
        return AccessToken(
            access_token=conn.access_token, expires_at=conn.access_token_expires_at, realm_id=conn.realm_id
        )

    async def access_token(self, conn: ConnectionView, *, force: bool = False) -> AccessToken:
        """A token valid for at least five minutes (a new one when force is set)."""
        usable_or_raise(conn)
        fresh = None if force else self.fresh_token(conn)
        if fresh is not None:
            return fresh
        asked_at = datetime.now(UTC)

        def needed(now: datetime) -> _Due:
            # A forced refresh is satisfied by any refresh that happened after it was asked for.
            return _Due(valid_until=now + MIN_VALIDITY, refreshed_after=asked_at if force else None)

        token, _ = await self._single_flight(
            conn.id, needed, trigger="request", purpose="forced" if force else "request"
        )
        assert token is not None  # only keep-alive passes skip
        return token

    async def keep_alive(self, connection_id: uuid.UUID) -> bool:
        """Refresh if the connection is still due when its lock is ours. True if refreshed."""
        include_access = self._settings.keepalive_refresh_access_tokens

        def needed(now: datetime) -> _Due:
            # With access tokens: one that would not be fresh enough five minutes from now.
            return _Due(
                keepalive_by=now,
                valid_until=(now + timedelta(minutes=5) + MIN_VALIDITY if include_access else None),
            )

        # A connection another replica is refreshing (or changing) right now is theirs.
        _, refreshed = await self._single_flight(
            connection_id, needed, trigger="keepalive", purpose="keepalive", skip_locked=True
        )
        return refreshed

    async def _single_flight(
        self,
        connection_id: uuid.UUID,
        needed: _Needed,
        *,
        trigger: str,
        purpose: str,
        skip_locked: bool = False,
    ) -> tuple[AccessToken | None, bool]:
        """Coalesce concurrent refreshes of one connection inside this process.

        The refresh runs as a task of its own: a caller that goes away (a client hanging up)
        cannot cut it short between Intuit's answer and the commit of the new tokens.
        """
        if self._closing:
            raise IntuitUnavailableProblem(
                "The broker is shutting down; retry.", retry_after=1, connection_id=str(connection_id)
            )
        key = (connection_id, purpose)
        if not timeline_log.isEnabledFor(logging.DEBUG):
            return await shared(
                self._inflight,
                key,
                lambda: self._refresh(
                    connection_id, needed, trigger=trigger, skip_locked=skip_locked, timeline=_OFF
                ),
                name=f"qbo-broker-refresh-{connection_id}",
            )
        entered = time.monotonic()
        timeline = self._timelines.get(key) if key in self._inflight else None
        if timeline is None:
            timeline = self._timelines[key] = Timeline()
        outcome = "ok"
        try:
            return await shared(
                self._inflight,
                key,
                lambda: self._refresh(
                    connection_id, needed, trigger=trigger, skip_locked=skip_locked, timeline=timeline
                ),
                name=f"qbo-broker-refresh-{connection_id}",
            )
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            if self._timelines.get(key) is timeline and key not in self._inflight:
                del self._timelines[key]
            timeline_log.debug(
                "refresh timeline",
                extra={
                    "timeline": json.dumps(
                        {
                            "request_id": request_id_var.get(),
                            "connection_id": str(connection_id),
                            "trigger": trigger,
                            "refresh": id(timeline),
                            "view": _view_began.get(),
                            "entered": entered,
                            "left": time.monotonic(),
                            "outcome": outcome,
                            "marks": timeline.marks,
                        }
                    )
                },
            )

    async def _refresh(
        self,
        connection_id: uuid.UUID,
        needed: _Needed,
        *,
        trigger: str,
        skip_locked: bool,
        timeline: Timeline,
    ) -> tuple[AccessToken | None, bool]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_limit

        async def due_after_look() -> tuple[bool, ConnectionRow]:
            conn = await self._read(connection_id)
            timeline.mark("read")
            if conn is None:
                raise NotFound("No such connection.")
            usable_or_raise(conn)
            return needed(datetime.now(UTC))(conn), conn

        # Watched from the start: a change committed after the watch began sets `changed`, and
        # a wait begins only after a look at the row that followed the last clear() of it, so
        # no commit can fall between the look that decided to wait and the wait.
        async with self._watch(str(connection_id)) as watch:
            looked = False  # at the row, since the last clear(), and found due
            while True:
                if loop.time() > deadline:
                    raise IntuitUnavailableProblem(
                        "Another replica's refresh of this connection is taking too long; the "
                        "stored credentials are unchanged. Retry later.",
                        retry_after=5,
                        connection_id=str(connection_id),
                    )
                # A refresh slot, then the lock: a process holds a lock only while it refreshes.
                # With every slot busy, it first asks whether another process holds the lock
                # (taking nothing): if one does, it waits for that one's commit without queueing
                # for a slot behind refreshes of other connections.
                free = not self._slots.locked()
                if not free:
                    free = await self._locks.is_free(connection_id)
                    timeline.mark("probed" if free else "probed_busy")
                if free:
                    # A keep-alive (skip_locked) just queues: whatever happens to the row
                    # meanwhile, its decision under the row lock sees it.
                    if skip_locked:
                        await self._slots.acquire()
                    else:
                        ready = await self._slot_or_token(watch, due_after_look, timeline)
                        if ready is not None:
                            return ready, False
                    try:
                        timeline.mark("slot")
                        hold = await self._locks.acquire(
                            connection_id,
                            on_sent=None if timeline.marks is None else lambda: timeline.mark("lock_sent"),
                        )
                        timeline.mark("lock_taken" if hold is not None else "lock_busy")
                        if hold is not None:
                            try:
                                return await self._refresh_holding_lock(
                                    connection_id,
                                    hold,
                                    needed,
                                    trigger=trigger,
                                    skip_locked=skip_locked,
                                    timeline=timeline,
                                )
                            except _LockLost:
                                continue
                            finally:
                                self._locks.release(hold)
                    finally:
                        self._slots.release()
                if skip_locked:
                    return None, False
                # Another process is refreshing (or this one, for another purpose). What made
                # this one ask was read before the watch began, and the other may have
                # committed since: look again before waiting.
                if not looked:
                    watch.changed.clear()
                    due, conn = await due_after_look()
                    if not due:
                        return self._token_of(conn), False
                # Its commit is notified (the poll is a safety net, for a holder gone without a
                # word). Whatever wakes the wait, look at the row, and ask for the lock again
                # only if it still needs a refresh.
                try:
                    async with asyncio.timeout(SAFETY_POLL_SECONDS if watch.notified else WAIT_POLL_SECONDS):
                        await watch.changed.wait()
                    timeline.mark("notified")
                except TimeoutError:
                    timeline.mark("polled")
                watch.changed.clear()  # before the look: a change after it wakes the next wait
                due, conn = await due_after_look()
                if not due:
                    return self._token_of(conn), False
                looked = True

    async def _slot_or_token(
        self,
        watch: Watch,
        look: Callable[[], Awaitable[tuple[bool, ConnectionRow]]],
        timeline: Timeline,
    ) -> AccessToken | None:
        """Take a refresh slot (None), or, if the row changes meanwhile and needs no refresh
        any more, give up the place in the queue and answer the row's token: a request waiting
        behind refreshes of other connections hears at once of the commit of another process's
        refresh of this one, instead of when a slot comes free. A change after which the row
        is still due keeps the place in the queue."""
        if not self._slots.locked():
            await self._slots.acquire()
            return None
        slot = asyncio.ensure_future(self._slots.acquire())
        try:
            while True:
                changed = asyncio.ensure_future(watch.changed.wait())
                try:
                    await asyncio.wait((slot, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if slot.done():
                    return None
                timeline.mark("notified_in_queue")
                watch.changed.clear()  # before the look: a change after it wakes the next wait
                due, conn = await look()
                if not due:
                    slot.cancel()  # a slot granted meanwhile is given back, here or by the semaphore
                    await asyncio.wait((slot,))
                    self._give_back(slot)
                    return self._token_of(conn)
        except BaseException:
            slot.cancel()
            slot.add_done_callback(self._give_back)
            raise

    def _give_back(self, slot: asyncio.Future[Any]) -> None:
        """A slot taken by an acquire whose caller no longer wants it (gone away, or answered
        from the row); an acquire that was cancelled took none."""
        if not slot.cancelled() and slot.exception() is None:
            self._slots.release()

    async def _refresh_holding_lock(
        self,
        connection_id: uuid.UUID,
        hold: Hold,
        needed: _Needed,
        *,
        trigger: str,
        skip_locked: bool,
        timeline: Timeline,
    ) -> tuple[AccessToken | None, bool]:
        for _ in range(MAX_ROUNDS):
            # 1. Re-read under the row lock (a writer of the row, such as a disconnect, finishes
            # first), decide, and record the attempt.
            decide = self._decide_or_skip if skip_locked else self._decide
            conn = await decide(connection_id, *needed(datetime.now(UTC)).args(), trigger)
            if conn is None:
                if skip_locked:
                    return None, False
                raise NotFound("No such connection.")
            usable_or_raise(conn)
            attempt = conn.attempt
            if attempt is None:  # not due (any more)
                return self._token_of(conn), False
            timeline.mark("attempt")
            try:
                refresh_token = credentials.open_refresh_token(conn, self._box)
            except BaseException:
                await self._outcomes.settle(attempt)  # nothing left for Intuit
                raise
            if not hold.valid:
                # The lock session was lost meanwhile, and another process may hold the lock
                # now: the token must not leave from here.
                await self._outcomes.settle(attempt)
                raise _LockLost
            # 2. Intuit, with no database connection held.
            outcome: TokenSet | IntuitError
            try:
                outcome = await self._intuit.refresh(refresh_token)
            except IntuitError as exc:
                outcome = exc
            timeline.mark("intuit")
            # 3. The outcome, committed before anyone hears of it.
            result = await self._outcomes.commit(conn, outcome, attempt=attempt, trigger=trigger)
            timeline.mark("stored")
            if result is not None:
                return result, True
            # The row changed under the refresh (disconnected, linked anew): look again.
        raise IntuitUnavailableProblem(
            "The connection kept changing during its refresh; retry.",
            retry_after=1,
            connection_id=str(connection_id),
        )
