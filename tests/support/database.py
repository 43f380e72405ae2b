"""A real PostgreSQL for the tests: DATABASE_URL's server if set, else an embedded one."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from service.core.db.engine import asyncpg_dsn

TABLES = [
    "webhook_deliveries",
    "webhook_endpoints",
    "events",
    "connection_events",
    "refresh_attempts",
    "pending_links",
    "authorization_states",
    "held_grants",
    "quickbooks_usage",
    "quickbooks_budgets",
    "quickbooks_budget_alerts",
    "pending_revocations",
    "quickbooks_realm_throttles",
    "intuit_notifications",
    "intuit_entity_changes",
    "quickbooks_user_claims",
    "api_keys",
    "connections",
]


@contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[str]:
    """The admin URL of a server to create test databases on; an embedded one is stopped after."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import pgserver

    server = pgserver.get_server(tmp_dir, cleanup_mode="stop")
    try:
        yield f"postgresql://postgres:@/postgres?host={tmp_dir}"
    finally:
        server.cleanup()


async def create_database(admin_url: str) -> str:
    """A new, empty database for this test run; returns its URL."""
    name = f"qbo_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(admin_url: str, database_url: str) -> None:
    name = make_url(database_url).database
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def truncate_all(database_url: str) -> None:
    """Empty every table. The suite's brokers keep working in the background meanwhile (metering
    flushes, the webhook sender, Intuit's notification processor), and a transaction of theirs
    can hold one table while the TRUNCATE holds another: PostgreSQL then aborts one of the two
    as a deadlock. Ours is tried again."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for attempt in range(10):
            try:
                await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
                return
            except asyncpg.DeadlockDetectedError:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
