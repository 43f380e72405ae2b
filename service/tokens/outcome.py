"""A refresh's outcome: what Intuit said, stored before anyone hears of it (service.store.connections'
conditional writes), counted, and turned into the caller's token or error."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service.core.cache import Caches
from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.errors import IntuitRejected, IntuitUnavailableProblem, ReauthorizationRequired
from service.core.metrics import REFRESH_TOKENS_LOST, REFRESHES
from service.domain import Status
from service.intuit import errors as intuit_errors
from service.intuit.client import TokenSet
from service.intuit.errors import IntuitError
from service.store import connections as store
from service.store.connections import DecisionRow, StoredRow
from service.tokens import credentials
from service.tokens.gathered import Gathered, columns
from service.tokens.view import AccessToken

log = logging.getLogger(__name__)

# Writing an outcome again after the database connection failed under it (the statement is
# conditional, so a write that did land the first time is not applied twice).
STORE_RETRY_DELAYS = (0.1, 0.3, 1.0)
_RETRIABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # lock_timeout and statement_timeout: the statement was rolled back, and a new token must
    # not be dropped for a row that was busy for a while.
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
)

_LOST_MESSAGE = (
    "Intuit's answer to a refresh was lost after it may have issued a new refresh "
    "token; a user must Connect again."
)
_REFUSED_MESSAGE = (
    "Intuit refused the refresh token (the app was disconnected in QuickBooks, "
    "the token expired, or it was replaced); a user must Connect again."
)


class Outcomes:
    """Stores refresh outcomes on the pool, for service.tokens.refresh.TokenRefresher."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, box: SecretBox, caches: Caches) -> None:
        self._settings = settings
        self._pool = pool
        self._box = box
        self._caches = caches
        # The new tokens of refreshes whose answers come at once (a storm's) go in one statement,
        # which passes over a row another transaction holds (a disconnect under way, say) rather
        # than make the others wait for it; that one is stored on its own, waiting for the row.
        self._stored: Gathered[StoredRow] = Gathered(
            lambda batch: store.store_tokens(pool, *columns(batch), skip_locked=True), "qbo-broker-outcomes"
        )
        self._storing: set[uuid.UUID] = set()  # connections with an outcome in _stored

    async def _store(self, connection_id: uuid.UUID, *args: Any) -> str | None:
        if connection_id in self._storing:
            # A second outcome for the same connection at once (possible only after a lock
            # session was lost): on its own, so that each gets its own answer.
            return await self._store_alone(connection_id, args)
        self._storing.add(connection_id)
        try:
            row = await self._stored(connection_id, *args)
        finally:
            self._storing.discard(connection_id)
        if row is not None and row.busy:
            return await self._store_alone(connection_id, args)
        return None if row is None else row.tenant_id

    async def _store_alone(self, connection_id: uuid.UUID, args: tuple[Any, ...]) -> str | None:
        """One outcome in a statement of its own, waiting for the row's lock."""
        (row,) = await store.store_tokens(self._pool, *columns([(connection_id, args)]))
        return row.tenant_id

    async def settle(self, attempt: int) -> None:
        """The attempt's refresh token did not reach Intuit, or its fate no longer matters."""
        await store.settle_attempt(self._pool, attempt)

    async def commit(
        self, conn: DecisionRow, outcome: TokenSet | IntuitError, *, attempt: int, trigger: str
    ) -> AccessToken | None:
        """Store what Intuit said, if the row still holds the token that was sent: the new
        tokens (returned), or the refusal (raised as the caller's error). None: the row changed
        meanwhile, its new state stands, and what Intuit said about the old token is moot."""
        sent = conn.refresh_token_issued_at
        if isinstance(outcome, TokenSet):
            now = datetime.now(UTC)
            sealed = credentials.sealed_tokens(
                conn,
                outcome,
                self._box,
                now=now,
                keepalive_age=(timedelta(seconds=self._settings.keepalive_refresh_age_seconds)),
            )
            # Persist the new refresh token before anything else can happen.
            tenant = await self._write(
                conn,
                lambda: self._store(
                    conn.id,
                    sent,
                    trigger,
                    sealed["access_token"],
                    sealed["refresh_token"],
                    sealed["access_token_expires_at"],
                    sealed["refresh_token_expires_at"],
                    now,
                    sealed["keepalive_due_at"],
                ),
            )
            if tenant is None:
                await self._superseded(conn, outcome, attempt, trigger)
                return None
            self._caches.connection_changed(str(conn.id), tenant)  # this replica reads it back
            REFRESHES.labels("ok", trigger).inc()
            assert conn.realm_id is not None
            return AccessToken(
                access_token=outcome.access_token,
                expires_at=sealed["access_token_expires_at"],
                realm_id=conn.realm_id,
            )
        if isinstance(outcome, intuit_errors.InvalidGrant):
            lost = outcome.after_lost_response or conn.unresolved
            now = datetime.now(UTC)
            code = "refresh_token_lost" if lost else "invalid_grant"
            details = {"code": code, **({"intuit_tid": outcome.intuit_tid} if outcome.intuit_tid else {})}
            tenant = await self._write(
                conn,
                lambda: store.mark_refused(
                    self._pool,
                    conn.id,
                    sent,
                    actor=trigger,
                    details=json.dumps(details),
                    code=code,
                    message=_LOST_MESSAGE if lost else _REFUSED_MESSAGE,
                    now=now,
                ),
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
                await self.settle(attempt)
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
            await self.settle(attempt)
        raise IntuitRejected(
            "Intuit refused the refresh request; the stored credentials are unchanged.",
            connection_id=str(conn.id),
        )

    async def _write(self, conn: DecisionRow, write: Callable[[], Awaitable[str | None]]) -> str | None:
        """Run a conditional write, again if the connection to the database fails under it."""
        for delay in (*STORE_RETRY_DELAYS, None):
            try:
                return await write()
            except _RETRIABLE as exc:
                if delay is None:
                    raise
                log.warning(
                    "storing a refresh outcome failed (%s); trying again",
                    type(exc).__name__,
                    extra={"connection_id": str(conn.id)},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _superseded(
        self, conn: DecisionRow, outcome: TokenSet | IntuitError, attempt: int, trigger: str
    ) -> None:
        log.warning(
            "refresh outcome set aside: the connection changed meanwhile",
            extra={"connection_id": str(conn.id), "outcome": type(outcome).__name__},
        )
        REFRESHES.labels("superseded", trigger).inc()
        await self.settle(attempt)
