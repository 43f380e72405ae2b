"""Which process refreshes a connection: PostgreSQL advisory locks, one session per process.

A refresh holds its connection's lock from before it re-reads the row until its outcome is
committed, across the call to Intuit. It holds it on a session of its own, not in a transaction
of the pool's: no pooled connection (and no open transaction) waits on Intuit, so a process can
have many refreshes in flight with a small pool. The locks are the session's (`pg_try_advisory_lock`),
so a process that dies, or loses the session, releases all of them at once: nothing stays stuck.

Session locks survive commits and nest within a session. This process takes each key at most
once (the set `_held`; callers already coalesce refreshes of a connection), and never lets a
caller's cancellation split a lock call from its bookkeeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import asyncpg

log = logging.getLogger(__name__)

_NAMESPACE = b"qbo-broker refresh "


def lock_key(connection_id: uuid.UUID) -> int:
    """The advisory lock key of a connection's refreshes (a signed 64-bit integer)."""
    digest = hashlib.sha256(_NAMESPACE + connection_id.bytes).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RefreshLocks:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn  # asyncpg's form (service.db.engine.asyncpg_dsn)
        self._session: asyncpg.Connection | None = None
        self._mutex = asyncio.Lock()  # one statement at a time on the session
        self._held: set[int] = set()

    async def try_acquire(self, connection_id: uuid.UUID) -> bool:
        """Take the connection's lock if no process (this one included) holds it."""
        return await asyncio.shield(self._try_acquire(lock_key(connection_id)))

    async def release(self, connection_id: uuid.UUID) -> None:
        await asyncio.shield(self._release(lock_key(connection_id)))

    def held(self, connection_id: uuid.UUID) -> bool:
        """Whether this process still holds the lock (False once its session was lost)."""
        return lock_key(connection_id) in self._held

    async def close(self) -> None:
        async with self._mutex:
            self._held.clear()
            if self._session is not None and not self._session.is_closed():
                await self._session.close(timeout=2)
            self._session = None

    async def _try_acquire(self, key: int) -> bool:
        async with self._mutex:
            if key in self._held:
                return False
            session = await self._live_session()
            try:
                taken = bool(await session.fetchval("SELECT pg_try_advisory_lock($1)", key))
            except BaseException:
                # Whether the lock was taken is unknown: end the session, which releases it.
                self._drop(session)
                raise
            if taken:
                self._held.add(key)
            return taken

    async def _release(self, key: int) -> None:
        async with self._mutex:
            if key not in self._held:
                return  # its session is gone, and the lock with it
            self._held.discard(key)
            session = self._session
            if session is None or session.is_closed():
                return
            try:
                await session.fetchval("SELECT pg_advisory_unlock($1)", key)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("refresh lock session failed on release; ending it")
                self._drop(session)

    async def _live_session(self) -> asyncpg.Connection:
        if self._session is None or self._session.is_closed():
            self._held.clear()  # whatever the old session held died with it
            self._session = await asyncpg.connect(self._dsn)
            self._session.add_termination_listener(self._on_lost)
        return self._session

    def _on_lost(self, session: asyncpg.Connection) -> None:
        if session is self._session:
            self._held.clear()
            self._session = None

    def _drop(self, session: asyncpg.Connection) -> None:
        session.terminate()
        self._on_lost(session)
