"""The process's one listener for new events, fanning them out to the live streams it serves.

Each process LISTENs on one PostgreSQL connection. A notification only says "something new":
the hub then reads the rows after the last `seq` it has seen, with one statement for every
stream of the process, and hands each stream the events of its tenant (and connection).

`seq` comes from a sequence, taken at insert; transactions commit in another order. A row read
with a lower `seq` still missing may be a transaction that has not committed yet, so rows wait
behind such a gap (HOLD_SECONDS at most) and go out in `seq` order, which is what makes a resume
from `Last-Event-ID` (everything after that event's `seq`) complete. A gap still open after
that is taken for a rolled-back transaction; a row that fills it later (LATE_SECONDS) still
reaches the live streams, out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from service.core.aio import cancel_and_wait
from service.core.listen import listen_forever
from service.events.delivery import body_of
from service.streams import repository

log = logging.getLogger(__name__)

HOLD_SECONDS = 2.0
LATE_SECONDS = 60.0
BATCH = 500
MAX_GAP = 1000
STREAMED_TYPE_PREFIX = "connection."  # the streams carry connection events, not data changes


@dataclass(frozen=True)
class StreamEvent:
    seq: int
    id: str
    type: str
    tenant_id: str
    connection_id: str | None
    message: bytes  # the whole SSE message, rendered once for every stream


def render(row: asyncpg.Record) -> StreamEvent:
    """An event row as an SSE message whose data is the webhook body."""
    connection_id = row["connection_id"]
    payload = body_of(row).decode()
    message = f"id: {row['id']}\nevent: {row['type']}\ndata: {payload}\n\n".encode()
    return StreamEvent(
        seq=int(row["seq"]),
        id=str(row["id"]),
        type=row["type"],
        tenant_id=row["tenant_id"],
        connection_id=None if connection_id is None else str(connection_id),
        message=message,
    )


def streamed(event_type: str) -> bool:
    return event_type.startswith(STREAMED_TYPE_PREFIX)


class StreamLimitReached(Exception):
    def __init__(self, scope: str) -> None:
        super().__init__(scope)
        self.scope = scope  # "tenant" or "process"


@dataclass(eq=False)
class Subscription:
    """One open stream: its filter and a bounded queue. A stream that does not keep up is
    ended (`overflowed`), never allowed to grow."""

    tenant_id: str
    connection_id: str | None
    queue: asyncio.Queue[StreamEvent | None]
    overflowed: bool = False
    closed: bool = False
    seen: set[str] = field(default_factory=set)  # ids already sent from the resume backlog

    def wants(self, event: StreamEvent) -> bool:
        return self.connection_id is None or event.connection_id == self.connection_id

    def offer(self, event: StreamEvent) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()

    def close(self) -> None:
        """End the stream: its writer sees None next (or at once, if its queue is full)."""
        if self.closed:
            return
        self.closed = True
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class StreamHub:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        *,
        channel: str,
        queue_size: int,
        max_streams: int,
        max_streams_per_tenant: int,
        retry_seconds: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._channel = channel
        self._queue_size = queue_size
        self._max_streams = max_streams
        self._max_per_tenant = max_streams_per_tenant
        self._retry = retry_seconds
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # Read state: every seq <= _cursor is sent or given up; rows above it wait in _held
        # while a lower seq is missing (_missing: seq -> when first missed); _late: given-up
        # seqs still watched for a late commit (seq -> until when).
        self._cursor: int | None = None
        self._read_upto = 0
        self._held: dict[int, StreamEvent | None] = {}
        self._missing: dict[int, float] = {}
        self._late: dict[int, float] = {}

    @property
    def open_streams(self) -> int:
        return self._count

    async def start(self, wait_seconds: float = 5.0) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="qbo-broker-stream-listener"),
            asyncio.create_task(self._read_loop(), name="qbo-broker-stream-reader"),
        ]
        try:
            async with asyncio.timeout(wait_seconds):
                await self._listening.wait()
        except TimeoutError:
            log.warning("event streams not listening yet; they start once PostgreSQL answers")

    async def close(self) -> None:
        """End every open stream, then stop listening."""
        self._closing = True
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription.close()
        for task in self._tasks:
            await cancel_and_wait(task)

    def subscribe(self, tenant_id: str, connection_id: str | None) -> Subscription:
        if self._closing:
            raise StreamLimitReached("process")
        tenant = self._subscriptions.setdefault(tenant_id, set())
        if len(tenant) >= self._max_per_tenant:
            raise StreamLimitReached("tenant")
        if self._count >= self._max_streams:
            raise StreamLimitReached("process")
        subscription = Subscription(tenant_id, connection_id, asyncio.Queue(self._queue_size))
        tenant.add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        tenant = self._subscriptions.get(subscription.tenant_id)
        if tenant is None or subscription not in tenant:
            return
        tenant.discard(subscription)
        self._count -= 1
        if not tenant:
            del self._subscriptions[subscription.tenant_id]

    async def backlog(
        self, *, tenant_id: str, connection_id: uuid.UUID | None, after_id: uuid.UUID, limit: int
    ) -> list[StreamEvent] | None:
        """The tenant's streamed events after `after_id`, in seq order; None when that id is not
        one of the tenant's events (unknown, or another tenant's) or more than
        `limit` follow it: the caller starts from now instead."""
        async with self._pool.acquire() as conn:
            after = await repository.seq_of(conn, event_id=after_id, tenant_id=tenant_id)
            if after is None:
                return None
            rows = await repository.tenant_events_after(
                conn,
                tenant_id=tenant_id,
                after=after,
                connection_id=connection_id,
                type_prefix=STREAMED_TYPE_PREFIX,
                limit=limit + 1,
            )
        if len(rows) > limit:
            return None
        return [render(row) for row in rows]

    # Listening and reading.

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        await listen_forever(
            self._dsn,
            {self._channel: self._on_notify},
            name="event streams",
            retry_seconds=self._retry,
            on_listening=self._on_listening,
            on_stopped=self._listening.clear,
            application_name="qbo-broker-streams",
        )

    async def _on_listening(self, conn: asyncpg.Connection) -> None:
        if self._cursor is None:  # the first time: streams begin now
            self._cursor = self._read_upto = await repository.latest_seq(conn)
        self._listening.set()
        self._wake.set()  # read what was committed while no one listened

    async def _read_loop(self) -> None:
        while True:
            timeout = self._next_deadline()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._cursor is None:
                continue
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next notification or the listener's return retries
                log.warning("event streams could not read new events: %s", type(exc).__name__)
                await asyncio.sleep(self._retry)
                self._wake.set()

    def _next_deadline(self) -> float | None:
        if not self._missing:
            return None
        return max(0.0, min(self._missing.values()) + HOLD_SECONDS - time.monotonic())

    async def _read(self) -> None:
        while True:
            watched = [*self._missing, *self._late]
            async with self._pool.acquire() as conn:
                rows = await repository.read_after(conn, after=self._read_upto, watched=watched, limit=BATCH)
            fresh = self._take(rows)
            self._advance()
            if fresh < BATCH:
                return

    def _take(self, rows: Iterable[asyncpg.Record]) -> int:
        """Place the rows read; returns how many were new (above what was read before)."""
        now = time.monotonic()
        fresh = 0
        assert self._cursor is not None
        for row in rows:
            seq = int(row["seq"])
            event = render(row) if streamed(row["type"]) else None
            if self._late.pop(seq, None) is not None:
                if event is not None:
                    self._fan_out(event)
                continue
            self._missing.pop(seq, None)
            if seq <= self._cursor:
                continue
            self._held[seq] = event
            if seq > self._read_upto:
                fresh += 1
                if seq - self._read_upto <= MAX_GAP:  # a wider jump (setval) is not waited for
                    for gap in range(self._read_upto + 1, seq):
                        self._missing.setdefault(gap, now)
                self._read_upto = seq
        self._late = {seq: until for seq, until in self._late.items() if until > now}
        return fresh

    def _advance(self) -> None:
        """Send the held rows that no open gap precedes, in seq order."""
        assert self._cursor is not None
        now = time.monotonic()
        while self._cursor < self._read_upto:
            following = self._cursor + 1
            if following in self._held:
                event = self._held.pop(following)
                if event is not None:
                    self._fan_out(event)
            elif following in self._missing:
                if self._missing[following] + HOLD_SECONDS > now:
                    return  # perhaps a transaction still committing: wait for it
                del self._missing[following]
                self._late[following] = now + LATE_SECONDS
            self._cursor = following

    def _fan_out(self, event: StreamEvent) -> None:
        for subscription in list(self._subscriptions.get(event.tenant_id, ())):
            if subscription.wants(event):
                subscription.offer(event)
