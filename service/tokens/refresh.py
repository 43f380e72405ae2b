"""Fresh access tokens, refreshed once per expiry however many callers and replicas ask.

Two layers. Inside a process, concurrent callers for one connection share one refresh (a task
per connection), so waiters hold nothing. Across processes, a refresh runs under the
connection's advisory lock (service.tokens.locks), held on a session of its own from before the
row is re-read until the outcome is committed; a process that finds the lock taken waits for
the holder's commit (its change notification; a slow poll is only a safety net) and reads the
new token from the row instead of spending the dead refresh token. It holds no refresh slot and
no pooled connection while it waits. A killed process releases its locks at once.

No pooled connection waits on Intuit. A refresh is three steps, in plain SQL on the asyncpg pool:
1. one statement under the row lock (so a writer of the row, such as a disconnect, is done
   first): re-read the row, decide, and record a refresh attempt (table refresh_attempts) if a
   refresh is due (the decisions of refreshes that come at once go in one statement, as do
   reads of rows);
2. the call to Intuit, holding no database connection;
3. one statement that stores the outcome (new tokens above all) if the row still holds the
   refresh token that was sent, settles the attempt records and logs the event. If the row
   changed meanwhile (a disconnect, a new link), its new state stands, and the refresh looks again.

The refresh attempt record is what a killed process cannot take back: Intuit may have rotated
the stored token for an answer that never arrived. A record left behind means "a refresh with
the stored token may have reached Intuit": a later `invalid_grant` is then reported as
`refresh_token_lost` (and counted), not blamed on a disconnect in QuickBooks.
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
from types import SimpleNamespace
from typing import Any

import asyncpg

from service.core.aio import shared
from service.core.cache import Caches, Watch
from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.errors import (
    IntuitRejected,
    IntuitUnavailableProblem,
    NotConnected,
    NotFound,
    ReauthorizationRequired,
)
from service.core.metrics import REFRESH_TOKENS_LOST, REFRESHES
from service.core.observability import request_id_var
from service.domain import Status
from service.events import outbox
from service.intuit import errors as intuit_errors
from service.intuit.client import IntuitClient, TokenSet
from service.intuit.errors import IntuitError
from service.tokens import credentials
from service.tokens.locks import Hold, RefreshLocks
from service.tokens.schemas import AccessTokenOut

log = logging.getLogger(__name__)
# Per-request refresh timings at DEBUG, for bench/refresh_storm.py: off unless a logging
# configuration turns this logger on, and then one line per request that waited on a refresh.
timeline_log = logging.getLogger("qbo_broker.refresh_timeline")

MIN_VALIDITY = timedelta(minutes=5)
# How long a process waits for another one's refresh before it looks at the row again. The
# holder's commit is notified (service.core.cache.ChangeFeed) and ends the wait within milliseconds;
# the timeout is a safety net, short only while the change feed is down.
SAFETY_POLL_SECONDS = 2.0
WAIT_POLL_SECONDS = 0.2  # while changes are not being notified
# Times a refresh starts over because the row changed under it, before it gives up.
MAX_ROUNDS = 3
# Writing an outcome again after the database connection failed under it (the statement is
# conditional, so a write that did land the first time is not applied twice).
STORE_RETRY_DELAYS = (0.1, 0.3, 1.0)
_RETRIABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


@dataclass(frozen=True)
class _Due:
    """When a connection needs a refresh, as of one moment. The same test runs in Python on a
    row that was read (`__call__`) and in SQL under the row lock (`_due`)."""

    valid_until: datetime | None = None  # the access token must be valid at least until then
    refreshed_after: datetime | None = None  # a refresh must have happened after this
    keepalive_by: datetime | None = None  # keepalive_due_at this or earlier

    def __call__(self, conn: Any) -> bool:
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


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    realm_id: str

    def __repr__(self) -> str:
        return f"AccessToken(realm_id={self.realm_id!r}, expires_at={self.expires_at!r})"

    def body(self, api_base_url: str) -> bytes:
        """The token endpoint's JSON answer."""
        return (
            AccessTokenOut(
                access_token=self.access_token,
                token_type="bearer",  # noqa: S106
                expires_at=self.expires_at,
                realm_id=self.realm_id,
                api_base_url=api_base_url,
            )
            .model_dump_json()
            .encode()
        )


@dataclass(frozen=True)
class ConnectionView:
    """What the token endpoint needs of a connection, with the access token opened: cacheable
    (service.core.cache) between changes of the row."""

    id: uuid.UUID
    tenant_id: str
    status: str
    realm_id: str | None
    refresh_token: bool  # whether one is stored
    access_token: str | None
    access_token_expires_at: datetime | None

    @classmethod
    def of(cls, conn: Any, box: SecretBox) -> ConnectionView:
        """From a Connection or a row of the connections table."""
        opened = (
            credentials.open_access_token(conn, box)
            if conn.access_token is not None and conn.status == Status.CONNECTED
            else None
        )
        return cls(
            id=conn.id,
            tenant_id=conn.tenant_id,
            status=conn.status,
            realm_id=conn.realm_id,
            refresh_token=conn.refresh_token is not None,
            access_token=opened,
            access_token_expires_at=conn.access_token_expires_at,
        )

    def __repr__(self) -> str:
        return f"ConnectionView(id={self.id}, status={self.status!r})"


def _fresh_enough(conn: Any, now: datetime) -> bool:
    return (
        conn.access_token is not None
        and conn.access_token_expires_at is not None
        and conn.access_token_expires_at - now >= MIN_VALIDITY
    )


def _usable_or_raise(conn: Any) -> None:
    if conn.status == Status.REAUTHORIZATION_REQUIRED:
        raise ReauthorizationRequired(
            "QuickBooks refused this connection's credentials; a user must Connect again.",
            connection_id=str(conn.id),
            connection_status=conn.status,
        )
    if conn.status != Status.CONNECTED or not conn.refresh_token:
        raise NotConnected(
            "The connection is not connected to QuickBooks.",
            connection_id=str(conn.id),
            connection_status=conn.status,
        )


# The refresher's statements: plain SQL on the asyncpg pool, few round trips, and every write
# one statement (atomic on its own), conditional on the row still holding the token that was sent.
_READ = """
SELECT id, tenant_id, status, realm_id, access_token, refresh_token, access_token_expires_at,
       refresh_token_issued_at, keepalive_due_at, last_refreshed_at
FROM connections WHERE id = ANY($1::uuid[])"""


def _due(valid_until: str, refreshed_after: str, keepalive_by: str) -> str:
    """_Due in SQL over a row `c`, its thresholds given as SQL expressions."""
    return f"""(
  ({valid_until} IS NOT NULL AND (c.access_token IS NULL OR c.access_token_expires_at IS NULL
                                  OR c.access_token_expires_at < {valid_until}))
  OR ({refreshed_after} IS NOT NULL AND (c.last_refreshed_at IS NULL
                                         OR c.last_refreshed_at < {refreshed_after}))
  OR ({keepalive_by} IS NOT NULL AND c.keepalive_due_at <= {keepalive_by}))"""


def _decide_statement(lock: str) -> str:
    """One statement under the row locks of several connections, each with its own rule and
    actor ($1 ids, $2 valid_until, $3 refreshed_after, $4 keepalive_by, $5 actors): for each
    connection, the row; whether a refresh attempt left behind names its stored refresh token
    (`unresolved`: the token may be dead already); and, if the connection is usable and a
    refresh is due (_due), a new refresh_attempts record naming that token by its issue time,
    whose id is `attempt` (else NULL). Rows are locked in id order. Atomic like the transaction
    it replaces, in one round trip for all of them."""
    return f"""
WITH asked AS (
  SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[],
                       $5::text[]) AS a(id, valid_until, refreshed_after, keepalive_by, actor)),
c AS (
  SELECT c.id, c.tenant_id, c.status, c.realm_id, c.access_token, c.refresh_token,
         c.access_token_expires_at, c.refresh_token_issued_at, c.keepalive_due_at,
         c.last_refreshed_at, a.valid_until, a.refreshed_after, a.keepalive_by, a.actor,
         EXISTS (SELECT 1 FROM refresh_attempts r
                 WHERE r.connection_id = c.id
                   AND r.refresh_token_issued_at IS NOT DISTINCT FROM c.refresh_token_issued_at)
           AS unresolved
  FROM connections c JOIN asked a ON a.id = c.id ORDER BY c.id {lock}),
attempt AS (
  INSERT INTO refresh_attempts (connection_id, refresh_token_issued_at, actor)
  SELECT c.id, c.refresh_token_issued_at, c.actor
  FROM c WHERE c.status = 'connected' AND c.refresh_token IS NOT NULL
    AND {_due("c.valid_until", "c.refreshed_after", "c.keepalive_by")}
  RETURNING id, connection_id)
SELECT c.id, c.tenant_id, c.status, c.realm_id, c.access_token, c.refresh_token,
       c.access_token_expires_at, c.refresh_token_issued_at, c.keepalive_due_at,
       c.last_refreshed_at, c.unresolved, t.id AS attempt
FROM c LEFT JOIN attempt t ON t.connection_id = c.id"""  # noqa: S608 (this module's literals)


_DECIDE = _decide_statement("FOR NO KEY UPDATE OF c")
_DECIDE_OR_SKIP = _decide_statement("FOR NO KEY UPDATE OF c SKIP LOCKED")


def _outcome_statement(assignments: str, event: str, public_event: str | None = None) -> str:
    """One statement that stores a refresh's outcome: it changes the row (`assignments`, from
    $5 on) only if the row still holds the refresh token the refresh started from ($1 id, $2 its
    refresh_token_issued_at), then drops its refresh_attempts records (the token's fate is
    known), logs `event` ($3 actor, $4 details) and, if given, publishes `public_event` with the
    connection's new state (service.events.outbox). It returns the tenant id if it applied."""
    published = (
        ""
        if public_event is None
        else f""",
published AS (INSERT INTO events (id, type, tenant_id, connection_id, data)
              SELECT gen_random_uuid(), '{public_event}', c.tenant_id, c.id,
                     {outbox.CONNECTION_STATE_SQL} FROM changed c)"""  # noqa: S608
    )
    return f"""
WITH changed AS (
  UPDATE connections SET {assignments}
  WHERE id = $1 AND status = 'connected' AND refresh_token IS NOT NULL
    AND refresh_token_issued_at IS NOT DISTINCT FROM $2
  RETURNING *),
settled AS (DELETE FROM refresh_attempts WHERE connection_id = $1 AND EXISTS (SELECT 1 FROM changed)),
logged AS (INSERT INTO connection_events (connection_id, tenant_id, type, actor, details)
           SELECT id, tenant_id, '{event}', $3, $4::jsonb FROM changed){published}
SELECT tenant_id FROM changed"""  # noqa: S608 (built from this module's literals only)


_STORE_TOKENS = _outcome_statement(
    "access_token = $5, refresh_token = $6, access_token_expires_at = $7, "
    "refresh_token_expires_at = $8, refresh_token_issued_at = $9, last_refreshed_at = $9, "
    "keepalive_due_at = $10, updated_at = $9",
    "refreshed",
)
_MARK_REFUSED = _outcome_statement(
    "status = 'reauthorization_required', last_error_code = $5, last_error_message = $6, "
    "last_error_at = $7, updated_at = $7",
    "refresh_failed",
    outbox.CONNECTION_REAUTHORIZATION_REQUIRED,
)
_SETTLE_ONE = "DELETE FROM refresh_attempts WHERE id = $1"

_LOST_MESSAGE = (
    "Intuit's answer to a refresh was lost after it may have issued a new refresh "
    "token; a user must Connect again."
)
_REFUSED_MESSAGE = (
    "Intuit refused the refresh token (the app was disconnected in QuickBooks, "
    "the token expired, or it was replaced); a user must Connect again."
)


def _row(record: asyncpg.Record) -> SimpleNamespace:
    return SimpleNamespace(**record)


# The args of one call of a gathered statement, and a batch of calls.
_Batch = list[tuple[uuid.UUID, tuple[Any, ...]]]


class _Gathered:
    """Calls of one statement for many connections, gathered: a call made while none is out goes
    at once; those made while one is out go together in the next statement, which starts after
    every one of them was made. A storm's hundreds of calls (reads on cache misses and by waiters
    woken by the same commit, decisions of the refreshes that just took their locks) take a
    pooled connection for a few round trips, instead of queueing for the pool one by one. Calls
    with the same connection and arguments share one answer; `run` returns one row per
    connection (by `id`), or none for a connection it did not find (the call's answer: None).
    """

    def __init__(self, run: Callable[[_Batch], Awaitable[list[asyncpg.Record]]], name: str) -> None:
        self._run = run
        self._name = name
        self._asked: dict[tuple[uuid.UUID, tuple[Any, ...]], asyncio.Future[asyncpg.Record | None]] = {}
        self._running: asyncio.Task[None] | None = None

    async def __call__(self, connection_id: uuid.UUID, *args: Any) -> asyncpg.Record | None:
        key = (connection_id, args)
        future = self._asked.get(key)
        if future is None:
            future = self._asked[key] = asyncio.get_running_loop().create_future()
            if self._running is None or self._running.done():
                self._running = asyncio.create_task(self._run_all(), name=self._name)
        return await asyncio.shield(future)

    async def _run_all(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                rows = {row["id"]: row for row in await self._run(list(asked))}
            except BaseException as exc:
                for future in asked.values():
                    if not future.done():
                        future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError(f"{self._name} stopped")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for (connection_id, _), future in asked.items():
                if not future.done():
                    future.set_result(rows.get(connection_id))


def _columns(batch: _Batch) -> list[list[Any]]:
    """A batch of decisions as the arrays _DECIDE takes: ids, then each argument's column."""
    return [[cid for cid, _ in batch], *(list(column) for column in zip(*(a for _, a in batch), strict=True))]


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
        self._read = _Gathered(lambda batch: pool.fetch(_READ, [cid for cid, _ in batch]), "qbo-broker-reads")
        self._decide = _Gathered(lambda batch: pool.fetch(_DECIDE, *_columns(batch)), "qbo-broker-decisions")
        self._decide_or_skip = _Gathered(
            lambda batch: pool.fetch(_DECIDE_OR_SKIP, *_columns(batch)), "qbo-broker-decisions"
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
            record = await self._read(connection_id)
            return None if record is None else ConnectionView.of(_row(record), self._box)

        return await self._caches.connections.get_or_load(str(connection_id), load)

    def _token_of(self, conn: Any) -> AccessToken:
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
            or not _fresh_enough(conn, datetime.now(UTC))
        ):
            return None
        assert conn.access_token and conn.access_token_expires_at and conn.realm_id
        return AccessToken(
            access_token=conn.access_token, expires_at=conn.access_token_expires_at, realm_id=conn.realm_id
        )

    async def access_token(self, conn: ConnectionView, *, force: bool = False) -> AccessToken:
        """A token valid for at least five minutes (a new one when force is set)."""
        _usable_or_raise(conn)
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

        async def due_after_look() -> tuple[bool, Any]:
            record = await self._read(connection_id)
            timeline.mark("read")
            if record is None:
                raise NotFound("No such connection.")
            conn = _row(record)
            _usable_or_raise(conn)
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
                    async with self._slots:
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
            record = await decide(connection_id, *needed(datetime.now(UTC)).args(), trigger)
            if record is None:
                if skip_locked:
                    return None, False
                raise NotFound("No such connection.")
            conn = _row(record)
            _usable_or_raise(conn)
            attempt = conn.attempt
            if attempt is None:  # not due (any more)
                return self._token_of(conn), False
            timeline.mark("attempt")
            try:
                refresh_token = credentials.open_refresh_token(conn, self._box)
            except BaseException:
                await self._pool.execute(_SETTLE_ONE, attempt)  # nothing left for Intuit
                raise
            if not hold.valid:
                # The lock session was lost meanwhile, and another process may hold the lock
                # now: the token must not leave from here.
                await self._pool.execute(_SETTLE_ONE, attempt)
                raise _LockLost
            # 2. Intuit, with no database connection held.
            outcome: TokenSet | IntuitError
            try:
                outcome = await self._intuit.refresh(refresh_token)
            except IntuitError as exc:
                outcome = exc
            timeline.mark("intuit")
            # 3. The outcome, committed before anyone hears of it.
            result = await self._commit_outcome(
                conn, outcome, attempt=attempt, unresolved=conn.unresolved, trigger=trigger
            )
            timeline.mark("stored")
            if result is not None:
                return result, True
            # The row changed under the refresh (disconnected, linked anew): look again.
        raise IntuitUnavailableProblem(
            "The connection kept changing during its refresh; retry.",
            retry_after=1,
            connection_id=str(connection_id),
        )

    async def _commit_outcome(
        self, conn: Any, outcome: TokenSet | IntuitError, *, attempt: int, unresolved: bool, trigger: str
    ) -> AccessToken | None:
        """Store what Intuit said, if the row still holds the token that was sent: the new
        tokens (returned), or the refusal (raised as the caller's error). None: the row changed
        meanwhile, its new state stands, and what Intuit said about the old token is moot."""
        sent = conn.refresh_token_issued_at
        if isinstance(outcome, TokenSet):
            now = datetime.now(UTC)
            columns = credentials.sealed_tokens(
                conn,
                outcome,
                self._box,
                now=now,
                keepalive_age=(timedelta(seconds=self._settings.keepalive_refresh_age_seconds)),
            )
            # Persist the new refresh token before anything else can happen.
            tenant = await self._write(
                _STORE_TOKENS,
                conn.id,
                sent,
                trigger,
                "{}",
                columns["access_token"],
                columns["refresh_token"],
                columns["access_token_expires_at"],
                columns["refresh_token_expires_at"],
                now,
                columns["keepalive_due_at"],
            )
            if tenant is None:
                await self._superseded(conn, outcome, attempt, trigger)
                return None
            self._caches.connection_changed(str(conn.id), tenant)  # this replica reads it back
            REFRESHES.labels("ok", trigger).inc()
            return AccessToken(
                access_token=outcome.access_token,
                expires_at=columns["access_token_expires_at"],
                realm_id=conn.realm_id,
            )
        if isinstance(outcome, intuit_errors.InvalidGrant):
            lost = outcome.after_lost_response or unresolved
            now = datetime.now(UTC)
            code = "refresh_token_lost" if lost else "invalid_grant"
            details = {"code": code, **({"intuit_tid": outcome.intuit_tid} if outcome.intuit_tid else {})}
            tenant = await self._write(
                _MARK_REFUSED,
                conn.id,
                sent,
                trigger,
                json.dumps(details),
                code,
                _LOST_MESSAGE if lost else _REFUSED_MESSAGE,
                now,
            )
            if tenant is None:
                await self._superseded(conn, outcome, attempt, trigger)
                return None
            self._caches.connection_changed(str(conn.id), tenant)
            REFRESHES.labels("invalid_grant", trigger).inc()
            if lost:
                REFRESH_TOKENS_LOST.inc()
                log.error(
                    "refresh token lost: an answer to a refresh was lost and Intuit has "
                    "since refused the token",
                    extra={"connection_id": str(conn.id), "intuit_tid": outcome.intuit_tid},
                )
            raise ReauthorizationRequired(
                "QuickBooks refused the refresh token (revoked in QuickBooks, expired, "
                "or replaced); a user must Connect again.",
                connection_id=str(conn.id),
                connection_status=Status.REAUTHORIZATION_REQUIRED,
            )
        # Nothing to store: the stored credentials stay as they are.
        if isinstance(outcome, intuit_errors.IntuitUnavailable):
            REFRESHES.labels("unavailable", trigger).inc()
            if not outcome.maybe_processed:  # Intuit never carried it out
                await self._pool.execute(_SETTLE_ONE, attempt)
            raise IntuitUnavailableProblem(
                "Intuit is not reachable right now; the stored credentials are unchanged. Retry later.",
                retry_after=outcome.retry_after or 30,
                connection_id=str(conn.id),
            )
        REFRESHES.labels("error", trigger).inc()
        log.error(
            "refresh failed: %s",
            type(outcome).__name__,
            extra={"connection_id": str(conn.id), "intuit_tid": outcome.intuit_tid},
        )
        if isinstance(outcome, intuit_errors.InvalidClient):  # refused before the token
            await self._pool.execute(_SETTLE_ONE, attempt)
        raise IntuitRejected(
            "Intuit refused the refresh request; the stored credentials are unchanged.",
            connection_id=str(conn.id),
        )

    async def _write(self, statement: str, *args: Any) -> Any:
        """Run a conditional write, again if the connection to the database fails under it."""
        for delay in (*STORE_RETRY_DELAYS, None):
            try:
                return await self._pool.fetchval(statement, *args)
            except _RETRIABLE as exc:
                if delay is None:
                    raise
                log.warning(
                    "storing a refresh outcome failed (%s); trying again",
                    type(exc).__name__,
                    extra={"connection_id": str(args[0])},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _superseded(
        self, conn: Any, outcome: TokenSet | IntuitError, attempt: int, trigger: str
    ) -> None:
        log.warning(
            "refresh outcome set aside: the connection changed meanwhile",
            extra={"connection_id": str(conn.id), "outcome": type(outcome).__name__},
        )
        REFRESHES.labels("superseded", trigger).inc()
        await self._pool.execute(_SETTLE_ONE, attempt)
