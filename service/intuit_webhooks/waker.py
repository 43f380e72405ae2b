"""Wakes every replica's processor after notifications were stored, one NOTIFY at a time.

A transaction that NOTIFYs holds a lock of the whole cluster through its commit (PostgreSQL
keeps notifications in commit order), WAL flush included: NOTIFY in each intake insert would
make the inserts commit one after another, one disk flush each. The intake's inserts commit
on their own (and flush together), and this sends one NOTIFY for all the rows stored while the
previous one was on its way; it is sent after those rows committed, so a processor it wakes
sees them."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "qbo_broker_intuit_notifications"


class NotificationWaker:
    def __init__(self) -> None:
        self._sending: asyncio.Task[None] | None = None
        self._again = False

    def wake(self, pool: asyncpg.Pool) -> None:
        """Announce rows committed before this call (without waiting for it)."""
        if self._sending is not None:
            self._again = True  # the NOTIFY on its way may have committed before those rows
            return
        self._sending = asyncio.create_task(self._send(pool), name="qbo-broker-intuit-wake")

    async def _send(self, pool: asyncpg.Pool) -> None:
        try:
            while True:
                self._again = False
                try:
                    await pool.execute("SELECT pg_notify($1, '')", CHANNEL)
                except Exception as exc:  # the processors' poll finds the rows anyway
                    log.warning("cannot wake the Intuit notification processors: %s",
                                type(exc).__name__)
                    return
                if not self._again:
                    return
        finally:
            self._sending = None
