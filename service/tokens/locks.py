"""Which process refreshes a connection: PostgreSQL advisory locks, one session per process.

A refresh holds its connection's lock from before it re-reads the row until its outcome is
committed, across the call to Intuit. It holds it on a session of its own, not in a transaction
of the pool's: no pooled connection (and no open transaction) waits on Intuit, so a process can
have many refreshes in flight with a small pool. The locks are the session's (`pg_try_advisory_lock`),
so a process that dies, or loses the session, releases all of them at once: nothing stays stuck.

Lock and unlock requests are sent in rounds: while one round is out, new requests gather, and
the next round takes them all in two statements. A storm of refreshes costs a few round trips
on the lock session, not two for each refresh in a row.

Session locks survive commits and nest within a session. This process asks for each key at
most once at a time (`_held`, `_asked`; callers already coalesce refreshes of a connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid

import asyncpg

from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_NAMESPACE = b"qbo-broker refresh "
_LOCK = "SELECT k FROM unnest($1::bigint[]) AS k WHERE pg_try_advisory_lock(k)"
_UNLOCK = "SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) AS k"


def lock_key(connection_id: uuid.UUID) -> int:
    """The advisory lock key of a connection's refreshes (a signed 64-bit integer)."""
    digest = hashlib.sha256(_NAMESPACE + connection_id.bytes).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RefreshLocks:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn  # asyncpg's form (service.db.engine.asyncpg_dsn)
        self._session: asyncpg.Connection | None = None
        self._held: set[int] = set()
        self._asked: dict[int, asyncio.Future[bool]] = {}  # for the next round
        self._freed: set[int] = set()  # to unlock in the next round
        self._rounds: asyncio.Task[None] | None = None

    async def try_acquire(self, connection_id: uuid.UUID) -> bool:
        """Take the connection's lock if no process (this one included) holds it."""
        key = lock_key(connection_id)
        if key in self._held or key in self._asked:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked[key] = future
        self._wake()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Whoever asked is gone: a lock taken for them must not stay taken.
            future.add_done_callback(lambda done: self._free_if_taken(key, done))
            raise

    async def release(self, connection_id: uuid.UUID) -> None:
        """Give the lock back (sent with the next round; this process may ask again at once)."""
        key = lock_key(connection_id)
        if key in self._held:
            self._held.discard(key)
            self._freed.add(key)
            self._wake()

    def held(self, connection_id: uuid.UUID) -> bool:
        """Whether this process still holds the lock (False once its session was lost)."""
        return lock_key(connection_id) in self._held

    async def close(self) -> None:
        await cancel_and_wait(self._rounds)
        for future in self._asked.values():
            if not future.done():
                future.set_result(False)
        self._asked.clear()
        self._forget()
        if self._session is not None and not self._session.is_closed():
            await self._session.close(timeout=2)
        self._session = None

    def _wake(self) -> None:
        if self._rounds is None or self._rounds.done():
            self._rounds = asyncio.create_task(self._run_rounds(), name="qbo-broker-refresh-locks")

    async def _run_rounds(self) -> None:
        while self._asked or self._freed:
            asked, self._asked = self._asked, {}
            freed, self._freed = list(self._freed), set()
            session = None
            try:
                session = await self._live_session()
                if freed:
                    await session.execute(_UNLOCK, freed)
                taken: set[int] = set()
                if asked:
                    taken = {row["k"] for row in await session.fetch(_LOCK, list(asked))}
                    self._held |= taken
            except BaseException as exc:
                # Which locks the session holds is unknown now: end it, which releases them all.
                if session is not None:
                    self._drop(session)
                for future in asked.values():
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception)
                                             else RuntimeError("refresh locks closed"))
                if not isinstance(exc, Exception):
                    raise
                log.warning("refresh lock session failed: %s", type(exc).__name__)
                continue
            for key, future in asked.items():
                if not future.done():
                    future.set_result(key in taken)

    def _free_if_taken(self, key: int, done: asyncio.Future[bool]) -> None:
        if not done.cancelled() and done.exception() is None and done.result():
            self._held.discard(key)
            self._freed.add(key)
            self._wake()

    async def _live_session(self) -> asyncpg.Connection:
        if self._session is None or self._session.is_closed():
            self._forget()  # whatever an old session held died with it
            self._session = await asyncpg.connect(self._dsn)
            self._session.add_termination_listener(self._on_lost)
        return self._session

    def _forget(self) -> None:
        self._held.clear()
        self._freed.clear()

    def _on_lost(self, session: asyncpg.Connection) -> None:
        if session is self._session:
            self._forget()
            self._session = None

    def _drop(self, session: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            session.terminate()
        self._on_lost(session)
