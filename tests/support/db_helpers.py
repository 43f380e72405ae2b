"""Direct SQL for test set-up and inspection (never to fake what the broker does)."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.core.db.engine import asyncpg_dsn


async def execute(database_url: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return str(await conn.execute(sql, *args))
    finally:
        await conn.close()


async def fetchrow(database_url: str, sql: str, *args: Any) -> asyncpg.Record | None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def expire_access_token(database_url: str, connection_id: str, seconds_left: int = 60) -> None:
    """Make the stored access token look nearly expired, as time passing would."""
    await execute(
        database_url,
        "UPDATE connections SET access_token_expires_at = now() + make_interval(secs => $2) WHERE id = $1",
        connection_id,
        seconds_left,
    )
