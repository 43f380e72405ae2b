"""Streams over real HTTP: helpers to open one, and to write event rows the way the outbox does."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from service.core.db.engine import asyncpg_dsn
from tests.conftest import Stack
from tests.support.sse import EventReader

OpenStream = Callable[..., Any]


@asynccontextmanager
async def stream(
    base_url: str, path: str, headers: dict[str, str], **params: str
) -> AsyncIterator[EventReader]:
    """An open stream whose answer was 200 (headers received: the broker has subscribed it)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=30)) as http:
        async with http.stream("GET", path, headers=headers, params=params) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield EventReader(response)


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    yield conn
    await conn.close()


async def insert_event(
    conn: asyncpg.Connection,
    tenant_id: str,
    connection_id: str | None = None,
    event_type: str = "connection.modules_changed",
    data: dict[str, Any] | None = None,
) -> str:
    """One event row, as the outbox writes it in the transaction of a change."""
    event_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO events (id, type, occurred_at, tenant_id, connection_id, data)"
        " VALUES ($1, $2, now(), $3, $4, $5::jsonb)",
        uuid.UUID(event_id),
        event_type,
        tenant_id,
        uuid.UUID(connection_id) if connection_id else None,
        json.dumps(data or {}),
    )
    return event_id


@pytest.fixture
def emit(db: asyncpg.Connection) -> Callable[..., Awaitable[str]]:
    async def run(
        tenant_id: str,
        connection_id: str | None = None,
        event_type: str = "connection.modules_changed",
        data: dict[str, Any] | None = None,
    ) -> str:
        return await insert_event(db, tenant_id, connection_id, event_type, data)

    return run
