"""One NOTIFY at a time on a channel, coalescing the wake-ups asked for while one is on its way.

A transaction that NOTIFYs holds a lock of the whole cluster through its commit (PostgreSQL
keeps notifications in commit order), WAL flush included: a NOTIFY in each of many small inserts
would make them commit one after another, one disk flush each. Inserts that commit on their own
(and flush together) and then call `wake` share one NOTIFY, sent after they committed, so a
listener it wakes sees them. Used by Intuit's webhook intake (service.intuit_webhooks)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)


class Waker:
    def __init__(self, channel: str) -> None:
        self._channel = channel
        self._sending: asyncio.Task[None] | None = None
        self._again = False

    def wake(self, pool: asyncpg.Pool) -> None:
        """Announce rows committed before this call (without waiting for it)."""
        if self._sending is not None:
            self._again = True  # the NOTIFY on its way may have committed before those rows
            return
        self._sending = asyncio.create_task(self._send(pool), name=f"qbo-broker-wake-{self._channel}")

    async def _send(self, pool: asyncpg.Pool) -> None:
        try:
            while True:
                self._again = False
                try:
                    await pool.execute("SELECT pg_notify($1, '')", self._channel)
                except Exception as exc:  # the listeners' polls find the rows anyway
                    log.warning("cannot notify %s: %s", self._channel, type(exc).__name__)
                    return
                if not self._again:
                    return
        finally:
            self._sending = None
