"""Fresh access tokens, refreshed once per expiry however many callers and replicas ask.

Two layers. Inside a process, concurrent callers for one connection share one refresh (a task
per connection), so waiters hold nothing. Across processes, a refresh runs under the
connection's advisory lock (service.tokens.locks), held on a session of its own from before the
row is re-read until the outcome is committed; a process that finds the lock taken waits for
the holder's commit (a change notification, or a short poll) and reads the new token from the
row instead of spending the dead refresh token. A killed process releases its locks at once.

No pooled connection waits on Intuit. A refresh is three steps:
1. a short transaction under the row lock: re-read the row (another replica may have refreshed
   meanwhile), decide, and commit a `refresh_attempt` record;
2. the call to Intuit, holding no database connection;
3. a short transaction under the row lock: commit the outcome (new tokens first of all), if the
   row still holds the refresh token that was sent. If it changed meanwhile (a disconnect, a
   new link), the row's new state stands and the refresh starts over from step 1.

The `refresh_attempt` record is what a killed process cannot take back: Intuit may have rotated
the stored token for an answer that never arrived. A record left behind means "a refresh with
the stored token may have reached Intuit": a later `invalid_grant` is then reported as
`refresh_token_lost` (and counted), not blamed on a disconnect in QuickBooks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import Settings
from service.connections import repository as repo
from service.connections.schemas import AccessTokenOut, Status
from service.db.models import Connection, ConnectionEvent
from service.errors import (
    IntuitRejected,
    IntuitUnavailable,
    NotConnected,
    NotFound,
    ReauthorizationRequired,
)
from service.intuit import errors as intuit_errors
from service.intuit.client import IntuitClient, TokenSet
from service.intuit.errors import IntuitError
from service.metrics import REFRESH_TOKENS_LOST, REFRESHES
from service.tokens import credentials
from service.tokens.crypto import SecretBox
from service.tokens.locks import RefreshLocks

log = logging.getLogger(__name__)

MIN_VALIDITY = timedelta(minutes=5)
REFRESH_ATTEMPT = "refresh_attempt"
# How long a process waits for another one's refresh before it looks at the row again (a
# change notification usually ends the wait sooner).
WAIT_POLL_SECONDS = 0.2
# Times a refresh starts over because the row changed under it, before it gives up.
MAX_ROUNDS = 3

_E = ConnectionEvent.__table__.c  # type: ignore[attr-defined]

_Needed = Callable[[Connection, datetime], bool]
# Given a connection id: an async context whose value is an asyncio.Event set when the row
# changes (service.cache.ChangeFeed.watching); None: poll.
Watch = Callable[[str], AbstractAsyncContextManager[asyncio.Event]]


@asynccontextmanager
async def _no_watch(_connection_id: str) -> AsyncIterator[asyncio.Event]:
    yield asyncio.Event()  # never set: waiting always polls


class _RowChanged(Exception):
    """The row no longer holds the refresh token that was sent: start over."""


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    realm_id: str

    def __repr__(self) -> str:
        return f"AccessToken(realm_id={self.realm_id!r}, expires_at={self.expires_at!r})"

    def body(self, api_base_url: str) -> bytes:
        """The token endpoint's JSON answer."""
        return AccessTokenOut(access_token=self.access_token, token_type="bearer",  # noqa: S106
                              expires_at=self.expires_at, realm_id=self.realm_id,
                              api_base_url=api_base_url).model_dump_json().encode()


@dataclass(frozen=True)
class ConnectionView:
    """What the token endpoint needs of a connection, with the access token opened: cacheable
    (service.cache) between changes of the row."""

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
        opened = (credentials.open_access_token(conn, box)
                  if conn.access_token is not None and conn.status == Status.CONNECTED else None)
        return cls(id=conn.id, tenant_id=conn.tenant_id, status=conn.status, realm_id=conn.realm_id,
                   refresh_token=conn.refresh_token is not None, access_token=opened,
                   access_token_expires_at=conn.access_token_expires_at)

    def __repr__(self) -> str:
        return f"ConnectionView(id={self.id}, status={self.status!r})"


def _fresh_enough(conn: Connection | ConnectionView, now: datetime) -> bool:
    return (conn.access_token is not None and conn.access_token_expires_at is not None
            and conn.access_token_expires_at - now >= MIN_VALIDITY)


def _usable_or_raise(conn: Connection | ConnectionView) -> None:
    if conn.status == Status.REAUTHORIZATION_REQUIRED:
        raise ReauthorizationRequired(
            "QuickBooks refused this connection's credentials; a user must Connect again.",
            connection_id=str(conn.id), connection_status=conn.status)
    if conn.status != Status.CONNECTED or not conn.refresh_token:
        raise NotConnected("The connection is not connected to QuickBooks.",
                           connection_id=str(conn.id), connection_status=conn.status)


async def _lock(session: AsyncSession, connection_id: uuid.UUID, *,
                skip_locked: bool = False) -> Connection | None:
    """The connection row, locked until the transaction ends (None: missing, or busy when
    skip_locked is set). FOR NO KEY UPDATE: it excludes every other writer of the row, but not
    the insertion of rows that refer to it (its events)."""
    stmt = sa.select(Connection).where(
        Connection.id == connection_id).with_for_update(  # type: ignore[arg-type]
            key_share=True, skip_locked=skip_locked)
    return (await session.execute(stmt)).scalar_one_or_none()


def _issued_at(conn: Connection) -> str | None:
    """Names the stored refresh token (not secret): it changes whenever a new one is stored."""
    return conn.refresh_token_issued_at.isoformat() if conn.refresh_token_issued_at else None


async def _unresolved_attempt(session: AsyncSession, conn: Connection) -> bool:
    """Did an earlier refresh send the stored refresh token to Intuit and never learn the outcome?"""
    rows = await session.execute(sa.select(_E.details).where(
        _E.connection_id == conn.id, _E.type == REFRESH_ATTEMPT))
    issued_at = _issued_at(conn)
    return any(details.get("refresh_token_issued_at") == issued_at for (details,) in rows.all())


async def _settle_attempts(session: AsyncSession, conn: Connection, *,
                           only: int | None = None) -> None:
    """Drop refresh_attempt records: all of them once Intuit has told the stored token's fate
    (it refreshed, or refused it), or just one attempt's when Intuit never saw its request."""
    stmt = sa.delete(ConnectionEvent).where(_E.connection_id == conn.id,
                                            _E.type == REFRESH_ATTEMPT)
    if only is not None:
        stmt = stmt.where(_E.id == only)
    await session.execute(stmt)


async def _settle_for(session: AsyncSession, conn: Connection,
                      outcome: TokenSet | IntuitError, *,
                      attempt: int) -> None:
    """Drop the attempt records that Intuit's answer resolved (see _settle_attempts)."""
    if isinstance(outcome, intuit_errors.InvalidGrant):
        await _settle_attempts(session, conn)  # the stored token's fate is known
    elif isinstance(outcome, intuit_errors.IntuitUnavailable):
        if not outcome.maybe_processed:  # Intuit never carried it out
            await _settle_attempts(session, conn, only=attempt)
    elif isinstance(outcome, intuit_errors.InvalidClient):  # refused before the token
        await _settle_attempts(session, conn, only=attempt)


class TokenRefresher:
    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 intuit: IntuitClient, box: SecretBox, locks: RefreshLocks, *,
                 watch: Watch | None = None) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._intuit = intuit
        self._box = box
        self._locks = locks
        self._watch = watch or _no_watch
        # One refresh task per connection and purpose ("request", "forced", "keepalive"): callers
        # join the one that decides by their own rule.
        self._inflight: dict[tuple[uuid.UUID, str], asyncio.Task[tuple[AccessToken | None, bool]]] = {}
        # Refreshes this process runs at once (each one call to Intuit at a time).
        self._slots = asyncio.Semaphore(settings.refresh_concurrency)

    def _token_of(self, conn: Connection) -> AccessToken:
        assert conn.access_token_expires_at is not None and conn.realm_id is not None
        return AccessToken(access_token=credentials.open_access_token(conn, self._box),
                           expires_at=conn.access_token_expires_at, realm_id=conn.realm_id)

    @staticmethod
    def fresh_token(conn: ConnectionView) -> AccessToken | None:
        """The view's own token if the connection is usable and the token fresh enough; None
        when access_token() would have to refresh (or refuse)."""
        if (conn.status != Status.CONNECTED or not conn.refresh_token
                or not _fresh_enough(conn, datetime.now(UTC))):
            return None
        assert conn.access_token and conn.access_token_expires_at and conn.realm_id
        return AccessToken(access_token=conn.access_token,
                           expires_at=conn.access_token_expires_at, realm_id=conn.realm_id)

    async def access_token(self, conn: ConnectionView, *, force: bool = False) -> AccessToken:
        """A token valid for at least five minutes (a new one when force is set)."""
        _usable_or_raise(conn)
        fresh = None if force else self.fresh_token(conn)
        if fresh is not None:
            return fresh
        asked_at = datetime.now(UTC)

        def needed(row: Connection, now: datetime) -> bool:
            if not _fresh_enough(row, now):
                return True
            # A forced refresh is satisfied by any refresh that happened after it was asked for.
            return force and (row.last_refreshed_at is None or row.last_refreshed_at < asked_at)

        token, _ = await self._single_flight(conn.id, needed, trigger="request",
                                             purpose="forced" if force else "request")
        assert token is not None  # only keep-alive passes skip
        return token

    async def keep_alive(self, connection_id: uuid.UUID) -> bool:
        """Refresh if the connection is still due when its lock is ours. True if refreshed."""
        include_access = self._settings.keepalive_refresh_access_tokens

        def needed(row: Connection, now: datetime) -> bool:
            if row.keepalive_due_at is not None and row.keepalive_due_at <= now:
                return True
            return include_access and not _fresh_enough(row, now + timedelta(minutes=5))

        # A row another replica holds is being refreshed (or changed) right now: leave it to them.
        _, refreshed = await self._single_flight(connection_id, needed, trigger="keepalive",
                                                 purpose="keepalive", skip_locked=True)
        return refreshed

    async def _single_flight(self, connection_id: uuid.UUID, needed: _Needed, *, trigger: str,
                             purpose: str, skip_locked: bool = False) -> tuple[AccessToken | None, bool]:
        """Coalesce concurrent refreshes of one connection inside this process.

        The refresh runs as a task of its own: a caller that goes away (a client hanging up)
        cannot cut it short between Intuit's answer and the commit of the new tokens.
        """
        key = (connection_id, purpose)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(connection_id, needed, trigger=trigger,
                                                     skip_locked=skip_locked),
                                       name=f"qbo-broker-refresh-{connection_id}")
            self._inflight[key] = task

            def done(finished: asyncio.Task[tuple[AccessToken | None, bool]]) -> None:
                if self._inflight.get(key) is finished:
                    del self._inflight[key]
                if not finished.cancelled():
                    finished.exception()  # retrieved: every waiter re-raises it itself

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _refresh(self, connection_id: uuid.UUID, needed: _Needed, *, trigger: str,
                       skip_locked: bool) -> tuple[AccessToken | None, bool]:
        while True:
            async with self._watch(str(connection_id)) as changed:
                async with self._slots:
                    if await self._locks.try_acquire(connection_id):
                        try:
                            return await self._refresh_holding_lock(
                                connection_id, needed, trigger=trigger, skip_locked=skip_locked)
                        finally:
                            await self._locks.release(connection_id)
                if skip_locked:
                    return None, False
                # Another process is refreshing: its commit notifies us (or it died: poll).
                try:
                    async with asyncio.timeout(WAIT_POLL_SECONDS):
                        await changed.wait()
                except TimeoutError:
                    pass
            async with self._sessionmaker() as session, session.begin():
                conn = await session.get(Connection, connection_id, populate_existing=True)
                if conn is None:
                    raise NotFound("No such connection.")
                _usable_or_raise(conn)
                if not needed(conn, datetime.now(UTC)):
                    return self._token_of(conn), False

    async def _refresh_holding_lock(self, connection_id: uuid.UUID, needed: _Needed, *,
                                    trigger: str, skip_locked: bool) -> tuple[AccessToken | None, bool]:
        for _ in range(MAX_ROUNDS):
            # 1. Re-read under the row lock, decide, and record the attempt.
            async with self._sessionmaker() as session, session.begin():
                conn = await _lock(session, connection_id, skip_locked=skip_locked)
                if conn is None:
                    if skip_locked:
                        return None, False
                    raise NotFound("No such connection.")
                _usable_or_raise(conn)
                if not needed(conn, datetime.now(UTC)):
                    return self._token_of(conn), False
                refresh_token = credentials.open_refresh_token(conn, self._box)
                sent = _issued_at(conn)
                unresolved = await _unresolved_attempt(session, conn)
                attempt = await self._record_attempt(session, conn, trigger)
            # 2. Intuit, with no database connection held.
            outcome: TokenSet | IntuitError
            try:
                outcome = await self._intuit.refresh(refresh_token)
            except IntuitError as exc:
                outcome = exc
            # 3. The outcome, committed under the row lock before anyone hears of it.
            try:
                return await self._commit_outcome(connection_id, outcome, sent=sent,
                                                  attempt=attempt, unresolved=unresolved,
                                                  trigger=trigger)
            except _RowChanged:
                continue
        raise IntuitUnavailable("The connection kept changing during its refresh; retry.",
                                retry_after=1, connection_id=str(connection_id))

    async def _commit_outcome(self, connection_id: uuid.UUID, outcome: TokenSet | IntuitError, *,
                              sent: str | None, attempt: int, unresolved: bool,
                              trigger: str) -> tuple[AccessToken, bool]:
        result: AccessToken | Exception
        async with self._sessionmaker() as session, session.begin():
            conn = await _lock(session, connection_id)
            if (conn is None or conn.status != Status.CONNECTED or conn.refresh_token is None
                    or _issued_at(conn) != sent):
                # Disconnected, linked anew or deleted while Intuit answered: the row's state
                # stands, and what Intuit said about the old token is moot.
                log.warning("refresh outcome set aside: the connection changed meanwhile",
                            extra={"connection_id": str(connection_id),
                                   "outcome": type(outcome).__name__})
                REFRESHES.labels("superseded", trigger).inc()
                if conn is not None:
                    await _settle_attempts(session, conn, only=attempt)
                result = _RowChanged()
            else:
                result = self._apply(session, conn, outcome, unresolved=unresolved,
                                     trigger=trigger)
                if isinstance(result, AccessToken):
                    await _settle_attempts(session, conn)
                    await repo.add_event(session, conn, "refreshed", actor=trigger)
                    REFRESHES.labels("ok", trigger).inc()
                else:
                    await _settle_for(session, conn, outcome, attempt=attempt)
        # Committed; only now does anyone hear of it.
        if isinstance(result, AccessToken):
            return result, True
        raise result

    def _apply(self, session: AsyncSession, conn: Connection, outcome: TokenSet | IntuitError, *,
               unresolved: bool, trigger: str) -> AccessToken | Exception:
        """Store new tokens (returning the access token), or the error to tell the caller."""
        if isinstance(outcome, intuit_errors.IntuitUnavailable):
            REFRESHES.labels("unavailable", trigger).inc()
            return IntuitUnavailable(
                "Intuit is not reachable right now; the stored credentials are unchanged. "
                "Retry later.", retry_after=outcome.retry_after or 30, connection_id=str(conn.id))
        if isinstance(outcome, intuit_errors.InvalidGrant):
            self._mark_reauthorization_required(
                session, conn, outcome, trigger, lost=outcome.after_lost_response or unresolved)
            return ReauthorizationRequired(
                "QuickBooks refused the refresh token (revoked in QuickBooks, expired, "
                "or replaced); a user must Connect again.",
                connection_id=str(conn.id), connection_status=Status.REAUTHORIZATION_REQUIRED)
        if isinstance(outcome, IntuitError):
            REFRESHES.labels("error", trigger).inc()
            log.error("refresh failed: %s", type(outcome).__name__,
                      extra={"connection_id": str(conn.id), "intuit_tid": outcome.intuit_tid})
            return IntuitRejected("Intuit refused the refresh request; the stored "
                                  "credentials are unchanged.", connection_id=str(conn.id))
        # Persist the new refresh token before anything else can happen.
        now = datetime.now(UTC)
        credentials.store_tokens(conn, outcome, self._box, now=now, keepalive_age=timedelta(
            seconds=self._settings.keepalive_refresh_age_seconds))
        conn.updated_at = now
        return self._token_of(conn)

    @staticmethod
    async def _record_attempt(session: AsyncSession, conn: Connection, trigger: str) -> int:
        """Record, in the transaction that commits before the token leaves, that this refresh
        token is about to be sent to Intuit. A refresher that finds it left behind knows Intuit
        may have rotated the stored token for an answer nobody received, and can say so if
        Intuit then refuses the token."""
        inserted = await session.execute(sa.insert(ConnectionEvent).values(
            connection_id=conn.id, tenant_id=conn.tenant_id, type=REFRESH_ATTEMPT,
            actor=trigger, details={"refresh_token_issued_at": _issued_at(conn)},
        ).returning(_E.id))
        return int(inserted.scalar_one())

    def _mark_reauthorization_required(self, session: AsyncSession, conn: Connection,
                                       exc: intuit_errors.InvalidGrant, trigger: str, *,
                                       lost: bool) -> None:
        """Status, last_error and an event; the stored tokens stay as they are."""
        now = datetime.now(UTC)
        if lost:
            REFRESH_TOKENS_LOST.inc()
            log.error("refresh token lost: an answer to a refresh was lost and Intuit has since "
                      "refused the token", extra={"connection_id": str(conn.id),
                                                  "intuit_tid": exc.intuit_tid})
        conn.status = Status.REAUTHORIZATION_REQUIRED
        conn.last_error_code = "refresh_token_lost" if lost else "invalid_grant"
        conn.last_error_message = (
            "Intuit's answer to a refresh was lost after it may have issued a new refresh token; "
            "a user must Connect again." if lost else
            "Intuit refused the refresh token (the app was disconnected in QuickBooks, the token "
            "expired, or it was replaced); a user must Connect again.")
        conn.last_error_at = now
        conn.updated_at = now
        REFRESHES.labels("invalid_grant", trigger).inc()
        session.add(ConnectionEvent(connection_id=conn.id, tenant_id=conn.tenant_id,
                                    type="refresh_failed", actor=trigger,
                                    details={"code": conn.last_error_code,
                                             **({"intuit_tid": exc.intuit_tid}
                                                if exc.intuit_tid else {})}))
