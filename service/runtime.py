"""What a running broker holds (settings, database, caches, Intuit client, keys, refresher), and
the one place that puts it together: `build_runtime()`, used by the app's lifespan, the worker,
the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.auth.jwt import JWTVerifier
from service.core.cache import Caches, ChangeFeed
from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.db.embedded import start_embedded_postgres
from service.core.db.engine import asyncpg_dsn, build_engine, build_sessionmaker, create_asyncpg_pool
from service.intuit.client import IntuitClient
from service.metering.meter import Meter
from service.metering.throttle import RealmThrottle
from service.tokens.locks import RefreshLocks
from service.tokens.refresh import TokenRefresher


@dataclass
class Runtime:
    settings: Settings
    database_url: str
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    pool: asyncpg.Pool  # plain asyncpg (autocommit), for the hot single statements, reads and writes
    caches: Caches
    feed: ChangeFeed | None  # None: no change feed, so the caches stay off
    intuit: IntuitClient
    box: SecretBox
    locks: RefreshLocks
    refresher: TokenRefresher
    jwt_verifier: JWTVerifier
    meter: Meter  # counts Accounting API calls, guards the tenants' CorePlus caps
    throttle: RealmThrottle  # Intuit's per-company limits, shared by every replica


def database_url_for(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL under BROKER_DATA_DIR (started if need be)."""
    return settings.database_url or start_embedded_postgres(settings.data_dir)


@asynccontextmanager
async def build_runtime(
    settings: Settings, *, database_url: str | None = None, change_feed: bool = True
) -> AsyncIterator[Runtime]:
    """Everything a broker process needs, opened in order and closed in reverse. Without the
    change feed, the caches stay off (every read goes to PostgreSQL): for one-off work that
    does not serve requests."""
    url = database_url or database_url_for(settings)
    dsn = asyncpg_dsn(url)
    async with AsyncExitStack() as stack:
        engine = build_engine(url, pool_size=settings.db_pool_size)
        stack.push_async_callback(engine.dispose)
        caches = Caches()
        feed = None
        if change_feed:
            feed = ChangeFeed(dsn, caches)
            await feed.start()
            stack.push_async_callback(feed.stop)
        pool = await create_asyncpg_pool(url, max_size=settings.db_pool_size)
        stack.push_async_callback(pool.close)
        meter = Meter(pool, settings)
        stack.push_async_callback(meter.aclose)  # writes what it counted, before the pool closes
        throttle = RealmThrottle(settings, pool)
        stack.push_async_callback(throttle.aclose)  # gives back its slots before the pool closes
        intuit = IntuitClient(settings)
        stack.push_async_callback(intuit.aclose)
        locks = RefreshLocks(dsn)
        stack.push_async_callback(locks.close)
        box = SecretBox(settings.parsed_encryption_keys)
        refresher = TokenRefresher(
            settings, pool, intuit, box, locks, caches, watch=feed.watching if feed is not None else None
        )
        stack.push_async_callback(refresher.aclose)  # first to close: refreshes finish first
        yield Runtime(
            settings=settings,
            database_url=url,
            engine=engine,
            sessionmaker=build_sessionmaker(engine, caches),
            pool=pool,
            caches=caches,
            feed=feed,
            intuit=intuit,
            box=box,
            locks=locks,
            refresher=refresher,
            jwt_verifier=JWTVerifier(settings),
            meter=meter,
            throttle=throttle,
        )


async def get_runtime(request: Request) -> Runtime:
    # async: a plain `def` dependency would be sent to the thread pool on every request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
