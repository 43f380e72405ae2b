"""LISTEN on PostgreSQL channels from a connection of one's own, for as long as a task runs.

The change feed (caches), the event streams and Intuit's notification processor each keep one
such connection per process: when it is lost (a restart, a failover, a network cut) they are
told, and it is opened again after a pause, until the task is cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


async def listen_forever(
    dsn: str,
    channels: Mapping[str, Callable[..., Any]],
    *,
    name: str,
    retry_seconds: float,
    on_listening: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    on_stopped: Callable[[], None] | None = None,
    application_name: str | None = None,
) -> None:
    """Listen on `channels` (each with its asyncpg callback). `on_listening` runs once the
    listeners are in place (on every connection: anything sent while none was listening was
    missed), `on_stopped` whenever that connection is lost or cannot be opened."""
    settings = {"application_name": application_name} if application_name else None
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn, server_settings=settings)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            for channel, callback in channels.items():
                await conn.add_listener(channel, callback)
            if on_listening is not None:
                await on_listening(conn)
            await lost.wait()
            log.warning("%s lost its listening connection; listening again", name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: told, then tried again after a pause
            log.warning("%s cannot listen: %s", name, type(exc).__name__)
        finally:
            if on_stopped is not None:
                on_stopped()
            if conn is not None and not conn.is_closed():
                await conn.close(timeout=2)
        await asyncio.sleep(retry_seconds)
