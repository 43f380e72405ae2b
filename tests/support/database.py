"""A real PostgreSQL for the tests: DATABASE_URL's server if set, else an embedded one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from service.db.engine import asyncpg_dsn

TABLES = ["connection_events", "pending_links", "authorization_states", "pending_revocations",
          "quickbooks_user_claims", "api_keys", "connections"]


def server_url(tmp_dir: Path) -> str:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from service.db.embedded import start_embedded_postgres

    return start_embedded_postgres(tmp_dir, database="postgres")


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
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    finally:
        await conn.close()
