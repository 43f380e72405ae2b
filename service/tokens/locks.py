"""Which process refreshes a connection: PostgreSQL advisory locks, one session per process.

A refresh holds its connection's lock from before it re-reads the row until its outcome is
committed, across the call to Intuit. It holds it on a session of its own, not in a transaction
of the pool's: no pooled connection (and no open transaction) waits on Intuit, so a process can
have many refreshes in flight with a small pool. The locks are the session's (`pg_try_advisory_lock`),
so a process that dies, or loses the session, releases all of them at once: nothing stays stuck.
The session asks the server to probe it with TCP keepalives, so a session cut off by the
network is ended (and its locks released) within a minute, and a process that lost its session
ends the old backend itself when it connects again.

Lock, unlock and probe requests are sent in rounds: a request made while the session is idle
goes out at once; while one round is out, new requests gather, and the next round takes them
all in one statement. A storm of refreshes costs a few round trips on the lock session, not two
for each refresh in a row. A probe (`is_free`) tells whether another process holds a lock
without taking it: a process whose refresh slots are all busy uses it to learn whether to wait
for another process's refresh or for a slot of its own.

Session locks nest within a session, so this process never asks for a key it holds or is asking
for. Each grant is a `Hold`: releasing it, or asking whether it still stands, concerns that
grant only, never a later one of the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from service.core.aio import cancel_and_wait

log = logging.getLogger(__name__)

_NAMESPACE = b"qbo-broker refresh "
# A round in one statement: take the keys asked for ($1) that are free, tell which of the keys
# probed ($2) no other session of this database holds (read from pg_locks: a probe takes nothing,
# not even for an instant, so it can never make another process's ask fail), and unlock the keys
# freed ($3). Each part runs for all its keys (a one-row target list is always evaluated), and
# their order does not matter: a key both freed and asked for is either unlocked then taken
# again (or not, if another process was quicker), or taken once more (locks nest) then unlocked
# once, still held. A bigint key shows in pg_locks as its high and low 32 bits.
_ROUND = """
SELECT ARRAY(SELECT k FROM unnest($1::bigint[]) AS k WHERE pg_try_advisory_lock(k)) AS taken,
       ARRAY(SELECT k FROM unnest($2::bigint[]) AS k WHERE NOT EXISTS (
               SELECT 1 FROM pg_locks l
               WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                 AND l.pid <> pg_backend_pid()
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = k)) AS free,
       (SELECT count(*) FROM unnest($3::bigint[]) AS k WHERE pg_advisory_unlock(k)) AS freed"""
_SESSION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.AdminShutdownError)
_ROUND_SECONDS = 10.0  # a round that takes longer: the session is treated as lost
# The server probes an idle session after 30 s, every 10 s, and ends it after 3 silent probes.
_KEEPALIVES = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}


def lock_key(connection_id: uuid.UUID) -> int:
    """The advisory lock key of a connection's refreshes (a signed 64-bit integer)."""
    digest = hashlib.sha256(_NAMESPACE + connection_id.bytes).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(eq=False)
class Hold:
    """One grant of a connection's lock to this process."""

    key: int
    _locks: RefreshLocks = field(repr=False)

    @property
    def valid(self) -> bool:
        """False once released, or once the session that held it was lost."""
        return self._locks._held.get(self.key) is self


class RefreshLocks:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn  # asyncpg's form (service.core.db.engine.asyncpg_dsn)
        self._session: asyncpg.Connection | None = None
        # The backend of a session lost while it was open, and when it started (a pid alone may
        # have been reused by then).
        self._backend: tuple[int, object] | None = None
        self._lost: tuple[int, object] | None = None
        self._held: dict[int, Hold] = {}
        self._asked: dict[int, asyncio.Future[bool]] = {}  # for the next round
        self._on_sent: dict[int, Callable[[], None]] = {}  # told when their round goes out
        self._asking: set[int] = set()  # in the round that is out
        self._probed: dict[int, asyncio.Future[bool]] = {}  # for the next round, or out
        self._freed: set[int] = set()  # to unlock in the next round
        self._rounds: asyncio.Task[None] | None = None

    async def acquire(
        self, connection_id: uuid.UUID, *, on_sent: Callable[[], None] | None = None
    ) -> Hold | None:
        """The connection's lock if no process (this one included) holds it; None otherwise.
        `on_sent` is called when the request leaves for the server (for timings)."""
        key = lock_key(connection_id)
        if key in self._held or key in self._asked or key in self._asking:
            return None
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked[key] = future
        if on_sent is not None:
            self._on_sent[key] = on_sent
        self._wake()
        try:
            taken = await asyncio.shield(future)
        except asyncio.CancelledError:
            # Whoever asked is gone: a lock taken for them must not stay taken.
            future.add_done_callback(lambda done: self._free_if_taken(key, done))
            raise
        if not taken:
            return None
        hold = Hold(key, self)
        self._held[key] = hold
        return hold

    async def is_free(self, connection_id: uuid.UUID) -> bool:
        """Whether no process holds the connection's lock (this one included), asked without
        taking it: a process with no refresh slot free learns whether another process is at
        the connection, holding nothing. Concurrent probes of one key share one answer."""
        key = lock_key(connection_id)
        if key in self._held or key in self._asked or key in self._asking:
            return False
        future = self._probed.get(key)
        if future is None:
            future = self._probed[key] = asyncio.get_running_loop().create_future()
            self._wake()
        return await asyncio.shield(future)

    def release(self, hold: Hold) -> None:
        """Give the lock back, if this grant still stands (the unlock goes with the next round;
        this process may ask for the key again at once)."""
        if hold.valid:
            del self._held[hold.key]
            self._freed.add(hold.key)
            self._wake()

    async def close(self) -> None:
        await cancel_and_wait(self._rounds)
        for future in self._asked.values():
            if not future.done():
                future.set_result(False)
        self._asked.clear()
        self._on_sent.clear()
        for future in self._probed.values():
            if not future.done():
                future.set_result(False)
        self._probed.clear()
        self._forget()
        if self._session is not None and not self._session.is_closed():
            await self._session.close(timeout=2)
        self._session = None

    def _wake(self) -> None:
        if self._rounds is None or self._rounds.done():
            self._rounds = asyncio.create_task(self._run_rounds(), name="qbo-broker-refresh-locks")

    async def _run_rounds(self) -> None:
        while self._asked or self._freed or any(not f.done() for f in self._probed.values()):
            asked, self._asked = self._asked, {}
            freed, self._freed = list(self._freed), set()
            probed = {k: f for k, f in self._probed.items() if not f.done()}
            self._asking = set(asked)
            if self._on_sent:
                for key in asked:
                    told = self._on_sent.pop(key, None)
                    if told is not None:
                        told()
            try:
                taken, free = await self._round(asked, list(probed), freed)
            except BaseException as exc:
                for future in (*asked.values(), *probed.values()):
                    if not future.done():
                        future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("refresh locks closed")
                        )
                if not isinstance(exc, Exception):
                    raise
                log.warning("refresh lock session failed: %s", type(exc).__name__)
                continue
            finally:
                self._asking = set()
                for key, future in probed.items():
                    if self._probed.get(key) is future:
                        del self._probed[key]
            for key, future in probed.items():
                if not future.done():
                    future.set_result(key in free)
            for key, future in asked.items():
                if not future.done():
                    future.set_result(key in taken)
                elif key in taken:  # asked, then given up on: give it back
                    self._freed.add(key)

    async def _round(
        self, asked: dict[int, asyncio.Future[bool]], probed: list[int], freed: list[int]
    ) -> tuple[set[int], set[int]]:
        """Unlock `freed`, take what is free of `asked`, tell what is free of `probed`; on a
        session found dead, once more on a new one (the dead session's locks are gone with it,
        including those to unlock)."""
        for retry in (True, False):
            session = None
            try:
                async with asyncio.timeout(_ROUND_SECONDS):
                    session = await self._live_session()
                    row = await session.fetchrow(_ROUND, list(asked), probed, freed)
                    assert row is not None
                    return set(row["taken"]), set(row["free"])
            except BaseException as exc:
                # Which locks the session holds is unknown now: end it, which releases them all.
                if session is not None:
                    self._drop(session)
                if not (retry and isinstance(exc, _SESSION_LOST)):
                    raise
                freed = []
        raise AssertionError("unreachable")

    def _free_if_taken(self, key: int, done: asyncio.Future[bool]) -> None:
        if not done.cancelled() and done.exception() is None and done.result():
            self._freed.add(key)
            self._wake()

    async def _live_session(self) -> asyncpg.Connection:
        if self._session is None or self._session.is_closed():
            self._forget()  # whatever an old session held died with it
            session = await asyncpg.connect(self._dsn, server_settings=_KEEPALIVES)
            if self._lost is not None:
                # A session cut off by the network may live on at the server, holding its locks
                # until the keepalives end it: end it now.
                await session.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid = $1 AND backend_start = $2",
                    *self._lost,
                )
                self._lost = None
            started = await session.fetchval(
                "SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
            self._backend = (session.get_server_pid(), started)
            session.add_termination_listener(self._on_lost)
            self._session = session
        return self._session

    def _forget(self) -> None:
        self._held.clear()
        self._freed.clear()

    def _on_lost(self, session: asyncpg.Connection) -> None:
        if session is self._session:
            self._lost = self._backend
            self._forget()
            self._session = None

    def _drop(self, session: asyncpg.Connection) -> None:
        self._on_lost(session)
        with contextlib.suppress(Exception):
            session.terminate()
