"""Fresh access tokens, refreshed once per expiry however many callers and replicas ask.

Two layers: inside a process, concurrent callers for one connection share one refresh (a future
per connection), so waiters hold no database connection; across processes, the refresh runs
under the connection's row lock (`SELECT … FOR NO KEY UPDATE`) and re-reads the row under it, so a
replica that waited finds the new token instead of spending the dead refresh token. The lock is
a transaction's: a killed process releases it. New tokens are committed before anyone sees them.

What a killed process cannot release is Intuit's side: it may have rotated the refresh token for
an answer that never arrived. So each refresh first commits a `refresh_attempt` record (its own
short transaction) and removes it with the outcome. A record left behind means "a refresh with
the stored token may have reached Intuit": a later `invalid_grant` is then reported as
`refresh_token_lost` (and counted), not blamed on a disconnect in QuickBooks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
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
from service.intuit.client import IntuitClient
from service.metrics import REFRESH_TOKENS_LOST, REFRESHES
from service.tokens import credentials
from service.tokens.crypto import SecretBox

log = logging.getLogger(__name__)

MIN_VALIDITY = timedelta(minutes=5)
REFRESH_ATTEMPT = "refresh_attempt"

_E = ConnectionEvent.__table__.c  # type: ignore[attr-defined]

_Needed = Callable[[Connection, datetime], bool]


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
    skip_locked is set).

    FOR NO KEY UPDATE rather than FOR UPDATE: it excludes every other refresher and every
    FOR UPDATE writer just the same, but lets the refresh_attempt record (a row whose foreign
    key takes FOR KEY SHARE on this one) be committed from a second session meanwhile.
    """
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


class TokenRefresher:
    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 intuit: IntuitClient, box: SecretBox) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._intuit = intuit
        self._box = box
        self._inflight: dict[uuid.UUID, asyncio.Future[tuple[AccessToken | None, bool]]] = {}
        # A refresh holds a pooled connection (its lock) while it takes a second one for the
        # refresh_attempt record. The pool holds twice its base size (max_overflow equals it), so
        # capping refreshes at the base size always leaves a second connection for each.
        self._slots = asyncio.Semaphore(settings.db_pool_size)

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

        token, _ = await self._single_flight(conn.id, needed, trigger="request")
        if token is None:  # a keep-alive pass found the row busy; ask again, waiting this time
            token, _ = await self._single_flight(conn.id, needed, trigger="request")
        assert token is not None
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
                                                 skip_locked=True)
        return refreshed

    async def _single_flight(self, connection_id: uuid.UUID, needed: _Needed, *,
                             trigger: str, skip_locked: bool = False) -> tuple[AccessToken | None, bool]:
        """Coalesce concurrent refreshes of one connection inside this process."""
        running = self._inflight.get(connection_id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[tuple[AccessToken | None, bool]] = (
            asyncio.get_running_loop().create_future())
        self._inflight[connection_id] = future
        try:
            result = await self._refresh_locked(connection_id, needed, trigger=trigger,
                                                skip_locked=skip_locked)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[connection_id]

    async def _refresh_locked(self, connection_id: uuid.UUID, needed: _Needed, *, trigger: str,
                              skip_locked: bool) -> tuple[AccessToken | None, bool]:
        async with self._slots, self._sessionmaker() as session:
            async with session.begin():
                conn = await _lock(session, connection_id, skip_locked=skip_locked)
                if conn is None:
                    if skip_locked:
                        return None, False
                    raise NotFound("No such connection.")
                _usable_or_raise(conn)
                # Re-read under the lock: another replica may have refreshed while we waited.
                if not needed(conn, datetime.now(UTC)):
                    return self._token_of(conn), False
                refresh_token = credentials.open_refresh_token(conn, self._box)
                unresolved = await _unresolved_attempt(session, conn)
                attempt = await self._record_attempt(conn, trigger)
                try:
                    tokens = await self._intuit.refresh(refresh_token)
                except intuit_errors.IntuitUnavailable as exc:
                    REFRESHES.labels("unavailable", trigger).inc()
                    if not exc.maybe_processed:  # Intuit never carried it out
                        await _settle_attempts(session, conn, only=attempt)
                    error: Exception = IntuitUnavailable(
                        "Intuit is not reachable right now; the stored credentials are "
                        "unchanged. Retry later.", retry_after=exc.retry_after or 30,
                        connection_id=str(conn.id))
                except intuit_errors.InvalidGrant as exc:
                    self._mark_reauthorization_required(
                        session, conn, exc, trigger, lost=exc.after_lost_response or unresolved)
                    await _settle_attempts(session, conn)
                    error = ReauthorizationRequired(
                        "QuickBooks refused the refresh token (revoked in QuickBooks, expired, "
                        "or replaced); a user must Connect again.",
                        connection_id=str(conn.id), connection_status=Status.REAUTHORIZATION_REQUIRED)
                except intuit_errors.IntuitError as exc:
                    REFRESHES.labels("error", trigger).inc()
                    log.error("refresh failed: %s", type(exc).__name__,
                              extra={"connection_id": str(conn.id), "intuit_tid": exc.intuit_tid})
                    if isinstance(exc, intuit_errors.InvalidClient):  # refused before the token
                        await _settle_attempts(session, conn, only=attempt)
                    error = IntuitRejected("Intuit refused the refresh request; the stored "
                                           "credentials are unchanged.", connection_id=str(conn.id))
                else:
                    # Persist the new refresh token before anything else can happen.
                    now = datetime.now(UTC)
                    credentials.store_tokens(conn, tokens, self._box, now=now, keepalive_age=timedelta(
                        seconds=self._settings.keepalive_refresh_age_seconds))
                    conn.updated_at = now
                    await _settle_attempts(session, conn)
                    await repo.add_event(session, conn, "refreshed", actor=trigger)
                    REFRESHES.labels("ok", trigger).inc()
                    return self._token_of(conn), True
            # The outcome is committed (the stored credentials untouched); now tell the caller.
            raise error

    async def _record_attempt(self, conn: Connection, trigger: str) -> int:
        """Commit, on its own, that this refresh token is about to be sent to Intuit.

        Everything in the locked transaction dies with this process; this record does not. A
        refresher that finds it left behind knows Intuit may have rotated the stored token for
        an answer nobody received, and can say so if Intuit then refuses the token.
        """
        async with self._sessionmaker() as session, session.begin():
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
