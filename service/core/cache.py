"""Read caches for the hot paths (link status, fresh tokens, API keys), kept correct across
replicas by PostgreSQL: triggers NOTIFY every change of a connection or an API key, and each
replica LISTENs and drops what changed. A replica also drops what it changed itself the moment
its own transaction commits, so a caller always reads its own writes.

A read that raced with a change must not put a stale value back: every entry is stored with the
"ticket" taken before its read, and refused if its key was invalidated after that ticket. While
the listening connection is down, the caches are off (every read goes to PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import asyncpg

from service.core.aio import cancel_and_wait, shared
from service.core.listen import listen_forever
from service.core.metrics import CACHES_ENABLED

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

CONNECTIONS_CHANNEL = "qbo_broker_connections"
API_KEYS_CHANNEL = "qbo_broker_api_keys"


class VersionedCache(Generic[K, V]):
    """A bounded LRU with a time-to-live, whose puts lose to concurrent invalidations."""

    def __init__(self, *, maxsize: int = 20_000, ttl: float = 300.0) -> None:
        self.enabled = False
        self._maxsize = maxsize
        self._ttl = ttl
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._epoch = 0
        self._invalidated: OrderedDict[K, int] = OrderedDict()  # key -> epoch of its last drop
        self._floor = 0  # tickets older than this are refused (history cleared or forgotten)
        self._loading: dict[K, asyncio.Task[V | None]] = {}

    def ticket(self) -> int:
        return self._epoch

    def get(self, key: K) -> V | None:
        if not self.enabled:
            return None
        item = self._entries.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return item[1]

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The cached value, or what `load` returns (None: nothing to cache, e.g. not found).
        Concurrent misses of one key share one load: a burst of callers after a change, or on
        a cold cache, costs one database read, not one each."""
        value = self.get(key)
        if value is not None:
            return value
        return await shared(self._loading, key, lambda: self._load(key, load))

    async def _load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        ticket = self.ticket()
        value = await load()
        if value is not None:
            self.put(key, value, ticket)
        return value

    def put(self, key: K, value: V, ticket: int) -> None:
        if not self.enabled or ticket < self._floor or self._invalidated.get(key, -1) > ticket:
            return
        self._entries[key] = (time.monotonic() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def invalidate(self, key: K) -> None:
        self._epoch += 1
        self._entries.pop(key, None)
        self._loading.pop(key, None)  # a load begun before the change serves no one after it
        self._invalidated[key] = self._epoch
        self._invalidated.move_to_end(key)
        while len(self._invalidated) > self._maxsize:
            _, forgotten = self._invalidated.popitem(last=False)
            self._floor = max(self._floor, forgotten)

    def clear(self) -> None:
        self._epoch += 1
        self._floor = self._epoch
        self._entries.clear()
        self._loading.clear()
        self._invalidated.clear()


class Caches:
    """The broker's caches and the one way to invalidate them."""

    def __init__(self) -> None:
        self.status: VersionedCache[str, bytes] = VersionedCache()  # tenant id -> /status body
        self.connections: VersionedCache[str, Any] = VersionedCache()  # connection id -> snapshot
        self.api_keys: VersionedCache[str, Any] = VersionedCache(ttl=60.0)  # key hash -> caller

    def _all(self) -> tuple[VersionedCache[Any, Any], ...]:
        return (self.status, self.connections, self.api_keys)

    def connection_changed(self, connection_id: str, tenant_id: str) -> None:
        self.connections.invalidate(connection_id)
        self.status.invalidate(tenant_id)

    def api_keys_changed(self) -> None:
        self.api_keys.clear()

    def set_enabled(self, enabled: bool) -> None:
        for cache in self._all():
            cache.clear()
            cache.enabled = enabled
        CACHES_ENABLED.set(1 if enabled else 0)


class Watch:
    """What one waiter hears of a connection's changes while its watch is open: `changed` is set
    when any replica's change of the connection is notified, and also whenever the feed
    connects or loses its connection (a change may have gone unheard: look again)."""

    __slots__ = ("_feed", "changed")

    def __init__(self, feed: ChangeFeed | None) -> None:
        self._feed = feed
        self.changed = asyncio.Event()

    @property
    def notified(self) -> bool:
        """Whether changes are being notified now. While not, nothing sets `changed` but the
        feed's coming back: wait with a short timeout."""
        return self._feed is not None and self._feed.listening


class ChangeFeed:
    """LISTENs on PostgreSQL for changes made by any replica; reconnects when the link drops."""

    def __init__(self, dsn: str, caches: Caches, *, retry_seconds: float = 2.0) -> None:
        self._dsn = dsn  # asyncpg's form (service.core.db.engine.asyncpg_dsn)
        self._caches = caches
        self._retry = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._listening = False
        self._watchers: dict[str, set[Watch]] = {}

    @property
    def listening(self) -> bool:
        return self._listening

    @asynccontextmanager
    async def watching(self, connection_id: str) -> AsyncIterator[Watch]:
        """A Watch of the connection, for as long as the context is open."""
        watch = Watch(self)
        watchers = self._watchers.setdefault(connection_id, set())
        watchers.add(watch)
        try:
            yield watch
        finally:
            watchers.discard(watch)
            if not watchers and self._watchers.get(connection_id) is watchers:
                del self._watchers[connection_id]

    def _wake_all(self) -> None:
        for watchers in self._watchers.values():
            for watch in watchers:
                watch.changed.set()

    async def start(self, wait_seconds: float = 5.0) -> None:
        self._task = asyncio.create_task(self._run(), name="qbo-broker-change-feed")
        try:
            async with asyncio.timeout(wait_seconds):
                await self._connected.wait()
        except TimeoutError:
            log.warning("change feed not connected yet; caches stay off until it is")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._caches.set_enabled(False)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == API_KEYS_CHANNEL:
            self._caches.api_keys_changed()
            return
        try:
            change = json.loads(payload)
            connection_id = str(change["id"])
            self._caches.connection_changed(connection_id, str(change["tenant_id"]))
        except (ValueError, KeyError, TypeError):
            self._caches.set_enabled(True)  # unreadable: drop everything, stay on
            self._wake_all()
            return
        for watch in self._watchers.get(connection_id, ()):
            watch.changed.set()

    async def _run(self) -> None:
        await listen_forever(
            self._dsn,
            {CONNECTIONS_CHANNEL: self._on_notify, API_KEYS_CHANNEL: self._on_notify},
            name="the change feed (caches off until it listens)",
            retry_seconds=self._retry,
            on_listening=self._on_listening,
            on_stopped=self._on_stopped,
        )

    async def _on_listening(self, _conn: asyncpg.Connection) -> None:
        # Anything cached before this point may have missed a notification, and so may anyone
        # waiting for one.
        self._caches.set_enabled(True)
        self._listening = True
        self._connected.set()
        self._wake_all()

    def _on_stopped(self) -> None:
        self._caches.set_enabled(False)
        if self._listening:  # waiters stop counting on notifications
            self._listening = False
            self._wake_all()
