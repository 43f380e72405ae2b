"""The async engine and the one session dependency every request uses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from service.core.cache import Caches
from service.core.db.models import ApiKey, Connection

# A server that does not answer (a network cut, a host gone) fails a connection attempt after
# this long, and the request that needed it with 503 database_unavailable, rather than after
# asyncpg's default of a minute.
CONNECT_TIMEOUT_SECONDS = 5.0
# A statement waiting this long for a row lock, or running this long, fails (as 503) instead of
# holding a pooled connection and its caller indefinitely.
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "30s"

log = logging.getLogger(__name__)


def async_url(database_url: str) -> str:
    """`postgresql://…` as given by operators, in the form SQLAlchemy's asyncpg dialect wants."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        url = url.set(drivername="postgresql+asyncpg")
    return url.render_as_string(hide_password=False)


def asyncpg_dsn(database_url: str) -> str:
    """The same URL in the plain form asyncpg.connect() accepts."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def build_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        async_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it would cost a round trip per checkout on the hot paths. A connection
        # that died is discarded by the pool when it fails, and recycling bounds their age.
        pool_recycle=1800,
        # Named in pg_stat_activity, so operators can tell the broker's sessions apart.
        connect_args={
            "server_settings": {
                "application_name": "qbo-broker",
                "lock_timeout": LOCK_TIMEOUT,
                "statement_timeout": STATEMENT_TIMEOUT,
            },
            "timeout": CONNECT_TIMEOUT_SECONDS,
        },
    )


def build_sessionmaker(engine: AsyncEngine, caches: Caches | None = None) -> async_sessionmaker[AsyncSession]:
    """Sessions that, given caches, drop what they changed from them when they commit."""
    return async_sessionmaker(
        engine,
        expire_on_commit=False,
        sync_session_class=TrackingSession,
        info={"caches": caches} if caches is not None else None,
    )


def after_commit(session: AsyncSession, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` once the session's transaction has committed, holding no lock or transaction:
    the place for calls to Intuit that the transaction queued (the outbox). Work must find what
    it acts on in the database, so that a rolled-back savepoint leaves it nothing to do."""
    session.info.setdefault("after_commit", []).append(work)


async def run_after_commit(session: AsyncSession) -> None:
    for work in session.info.pop("after_commit", []):
        try:
            await work()
        except Exception:  # what it queued stays queued, for the background worker
            log.exception("work after commit failed")


@asynccontextmanager
async def transaction(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session in one transaction; work registered with `after_commit` runs once it committed
    (and is dropped if it rolled back)."""
    async with sessionmaker() as session:
        async with session.begin():
            yield session
        await run_after_commit(session)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed when the handler succeeds, rolled back otherwise; then
    the work queued for after the commit (revocations at Intuit) runs."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            session.info.pop("after_commit", None)
            await session.rollback()
            raise
        else:
            await session.commit()
            await run_after_commit(session)


# Committed before the response is sent, so a client never reads ahead of its own write.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def _nothing_to_reset(_connection: asyncpg.Connection) -> None:
    return None


async def create_asyncpg_pool(database_url: str, *, max_size: int) -> asyncpg.Pool:
    """A plain asyncpg pool for the hot single statements, reads and writes (autocommit, no
    session state): the token endpoint's reads and the refresher's, metering, throttles, streams.

    Such statements leave nothing behind on a connection, so the pool skips asyncpg's default reset
    (`RESET ALL`, `UNLISTEN *`, … : one more round trip on every release)."""
    return await asyncpg.create_pool(
        asyncpg_dsn(database_url),
        min_size=1,
        max_size=max_size,
        reset=_nothing_to_reset,
        timeout=CONNECT_TIMEOUT_SECONDS,
        server_settings={
            "application_name": "qbo-broker",
            "lock_timeout": LOCK_TIMEOUT,
            "statement_timeout": STATEMENT_TIMEOUT,
        },
    )


class TrackingSession(Session):
    """A Session that tells the caches which connections and API keys it committed changes to."""


def _changed_rows(session: Session) -> Iterable[Any]:
    return [*session.new, *session.dirty, *session.deleted]


@event.listens_for(TrackingSession, "after_flush")
def _collect(session: Session, _flush_context: Any) -> None:
    changed = session.info.setdefault("changed", set())
    for row in _changed_rows(session):
        if isinstance(row, Connection):
            changed.add((str(row.id), row.tenant_id))
        elif isinstance(row, ApiKey):
            changed.add(("api_keys", None))


@event.listens_for(TrackingSession, "after_commit")
def _invalidate(session: Session) -> None:
    # Changes flushed in a transaction that was rolled back are dropped too: harmless.
    changed = session.info.pop("changed", None)
    caches: Caches | None = session.info.get("caches")
    if not changed or caches is None:
        return
    for connection_id, tenant_id in changed:
        if connection_id == "api_keys":
            caches.api_keys_changed()
        else:
            caches.connection_changed(connection_id, tenant_id)
