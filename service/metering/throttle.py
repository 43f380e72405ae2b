"""Intuit's per-company limits, shared by every replica through PostgreSQL.

Each call is admitted by one statement (`qbo_broker_gateway_admit`, migration 0005) on the
realm's row in `quickbooks_realm_throttles`: under the row lock it reads PostgreSQL's clock, one
clock for every replica, and either stamps the call into the windows (the newest admissions, as
many as the largest limit) and takes an in-flight slot, or answers how long to wait. A slot is a
lease with an expiry: given back when the answer has been read, renewed while a long answer
streams, and lapsed (free again) if the replica holding it dies. A 429 from Intuit pauses the
realm for every replica (`paused_until`), whichever call met it (a gateway call, the Connect
flow's CompanyInfo read).

Slots are given back by the replica's next admission on the realm, in its statement and under
the same row lock before it looks for room (migration 0010), so a busy realm costs one statement
per call, not two; what no admission picks up within `RETURN_SECONDS` goes back in one statement
for all of it. Until then another replica sees the slot as taken a little longer than it is (the
safe side of the limit); this replica's own waiters are woken at once, and their admission
frees the slot before it looks.

Inside a process, callers of one realm queue in a FIFO and only the head asks PostgreSQL, so a
queue of fifty waiters costs one statement per admission, not fifty.

When the in-flight limit is the realm's only one (no windows, no pace), a call needs nothing
from PostgreSQL that the replica does not already hold: a finished call's slot, still leased to
this replica, goes to its next call of the realm as it is, without a statement (the statement
would give it back and take it again under the row lock, so other replicas see the same). Only
within `quickbooks_slot_reuse_seconds` of the statement that last admitted a call on the slot,
which bounds how late a pause set by another replica is seen here; a 429 met here stops it at
once. With the windows on, every call is stamped into them, so every call has
its statement; so does every batch while the batch limit is on. A slot carried by a statement
that failed is never reused (the statement may have freed it before failing).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from service.core.config import Settings
from service.core.errors import ProblemError

log = logging.getLogger(__name__)

# How often the head of a queue looks again while every in-flight slot is taken by another
# process (a release in this process wakes it at once).
BUSY_POLL_SECONDS = 0.02

# How long a finished call's slot waits for the realm's next admission to take it back.
RETURN_SECONDS = 0.02

# Longest pause an Intuit 429 imposes on a realm, whatever its Retry-After says.
MAX_PAUSE_SECONDS = 60.0

_ADMIT = "SELECT * FROM qbo_broker_gateway_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
_RELEASE = "SELECT qbo_broker_gateway_release($1, $2, $3)"
_RENEW = (
    "UPDATE quickbooks_realm_throttles "
    "SET leases[$2] = clock_timestamp() + make_interval(secs => $4) "
    "WHERE realm_id = $1 AND leases[$2] = $3 RETURNING leases[$2]"
)
_PAUSE = (
    "INSERT INTO quickbooks_realm_throttles AS t (realm_id, paused_until) "
    "VALUES ($1, clock_timestamp() + make_interval(secs => $2)) "
    "ON CONFLICT (realm_id) DO UPDATE SET paused_until = greatest("
    "coalesce(t.paused_until, '-infinity'), excluded.paused_until)"
)


class QuickBooksThrottled(ProblemError):
    status, code, title = 429, "quickbooks_throttled", "QuickBooks' limits for this company are reached"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1, **extra: object) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, **extra)


@dataclass
class Lease:
    """One admitted call: its in-flight slot (None when that limit is off) until released."""

    realm_id: str
    slot: int | None
    expires_at: datetime | None
    released: bool = False
    # The event loop's time when the statement that admitted a call on this slot was sent
    # (-inf: never to be reused). A reused lease cannot have lapsed nor been renewed: reuse
    # lasts at most 1 s, a lease at least 5 s and its first renewal comes after a third of it.
    admitted_at: float = -math.inf


@dataclass
class _Queue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0


class RealmThrottle:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._queues: dict[tuple[str, bool], _Queue] = {}
        self._interval = settings.quickbooks_interval_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        # Per realm: the leases of finished calls not yet given back, and the timer that gives
        # them back if no admission takes them first.
        self._returned: dict[str, list[Lease]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        # Slots go from one call to the next without a statement only if nothing needs
        # stamping: the windows and the pace off, the in-flight limit on.
        self._reuse_seconds = (
            settings.quickbooks_slot_reuse_seconds
            if settings.quickbooks_max_in_flight > 0
            and settings.quickbooks_per_second == 0
            and settings.quickbooks_per_minute == 0
            and self._interval == 0
            else 0.0
        )
        # Realms a 429 paused, seen here (the event loop's time it ends): no reuse until then.
        # Ended pauses are dropped by the next pause.
        self._paused: dict[str, float] = {}

    @asynccontextmanager
    async def _queue(self, realm_id: str, batch: bool) -> AsyncIterator[_Queue]:
        key = (realm_id, batch)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.users += 1
        try:
            yield queue
        finally:
            queue.users -= 1
            if queue.users == 0:
                del self._queues[key]

    async def admit(self, realm_id: str, *, batch: bool, wait_seconds: float) -> Lease:
        """A lease for one call to Intuit, waiting at most `wait_seconds` for room; else
        QuickBooksThrottled with a Retry-After."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        hint = 1.0
        async with self._queue(realm_id, batch) as queue:
            try:
                async with asyncio.timeout_at(deadline):
                    await queue.lock.acquire()
            except TimeoutError:
                raise self._throttled(realm_id, hint) from None
            try:
                while True:
                    queue.released.clear()
                    reused = self._reuse(realm_id, batch)
                    if reused is not None:
                        return reused
                    sent_at = loop.time()
                    row = await self._admit_once(realm_id, batch)
                    if row["admitted"]:
                        return Lease(realm_id, row["slot"], row["lease"], admitted_at=sent_at)
                    wait = float(row["wait_seconds"] or 0.0)
                    hint = max(wait, BUSY_POLL_SECONDS)
                    left = deadline - loop.time()
                    if left <= 0 or wait > left:
                        raise self._throttled(realm_id, hint)
                    if row["busy"] and wait <= 0:
                        try:
                            async with asyncio.timeout(min(BUSY_POLL_SECONDS, left)):
                                await queue.released.wait()
                        except TimeoutError:
                            pass
                    else:
                        await asyncio.sleep(max(wait, 0.001))
            finally:
                queue.lock.release()

    @asynccontextmanager
    async def admitted(self, realm_id: str, *, wait_seconds: float) -> AsyncIterator[Lease]:
        """One call made within the realm's limits: admitted, then its slot given back."""
        lease = await self.admit(realm_id, batch=False, wait_seconds=wait_seconds)
        try:
            yield lease
        finally:
            self.release_soon(lease)

    def _reuse(self, realm_id: str, batch: bool) -> Lease | None:
        """A finished call's slot for the next call, without a statement, when nothing needs
        stamping and PostgreSQL admitted a call on it moments ago (see the module's text)."""
        if not self._reuse_seconds or (batch and self._settings.quickbooks_batch_per_minute):
            return None
        returned = self._returned.get(realm_id)
        if not returned:
            return None
        now = asyncio.get_running_loop().time()
        if self._paused.get(realm_id, -math.inf) > now:
            return None
        for i in range(len(returned) - 1, -1, -1):  # the last to finish first
            lease = returned[i]
            if now - lease.admitted_at < self._reuse_seconds:
                del returned[i]
                if not returned:
                    self._take_returned(realm_id)  # nothing left for the timer to give back
                return Lease(realm_id, lease.slot, lease.expires_at, admitted_at=lease.admitted_at)
        return None

    async def _admit_once(self, realm_id: str, batch: bool) -> asyncpg.Record:
        s = self._settings
        returned = self._take_returned(realm_id)
        # Shielded: a caller that goes away mid-statement must not leave a slot it never uses.
        statement = asyncio.ensure_future(
            self._pool.fetchrow(
                _ADMIT,
                realm_id,
                batch,
                s.quickbooks_max_in_flight,
                s.quickbooks_per_second,
                s.quickbooks_per_minute,
                s.quickbooks_batch_per_minute,
                s.quickbooks_window_margin_seconds,
                s.quickbooks_lease_seconds,
                self._interval,
                [lease.slot for lease in returned],
                [lease.expires_at for lease in returned],
            )
        )
        try:
            return await asyncio.shield(statement)
        except asyncio.CancelledError:
            statement.add_done_callback(self._release_orphan(realm_id, returned))
            raise
        except BaseException:
            # Not given back by this statement: by the next one, or by the timer.
            self._return_again(returned)
            raise

    def _return_again(self, leases: list[Lease]) -> None:
        """Leases a failed statement carried: it may have freed them in PostgreSQL before it
        failed (and another replica taken them since), so they are only given back again,
        never reused."""
        for lease in leases:
            lease.admitted_at = -math.inf
            self._queue_return(lease)

    def _release_orphan(self, realm_id: str, returned: list[Lease]):  # type: ignore[no-untyped-def]
        def done(statement: asyncio.Future[asyncpg.Record]) -> None:
            if statement.cancelled() or statement.exception() is not None:
                # The slots it carried may not have gone back: with the next admission, or soon.
                self._return_again(returned)
                return
            row = statement.result()
            if row["admitted"]:
                self.release_soon(Lease(realm_id, row["slot"], row["lease"]))

        return done

    def _throttled(self, realm_id: str, wait: float) -> QuickBooksThrottled:
        return QuickBooksThrottled(
            "QuickBooks' limits for this company are reached; retry after the delay given.",
            retry_after=max(1, math.ceil(wait)),
            realm_id=realm_id,
        )

    def release_soon(self, lease: Lease) -> None:
        """Give the call's slot back without making the caller wait (after an answer has been
        sent): with the realm's next admission, or within RETURN_SECONDS."""
        if lease.released:
            return
        lease.released = True
        for key in ((lease.realm_id, False), (lease.realm_id, True)):
            queue = self._queues.get(key)
            if queue is not None:
                queue.released.set()
        if lease.slot is not None:
            self._queue_return(lease)

    def _queue_return(self, lease: Lease) -> None:
        realm_id = lease.realm_id
        self._returned.setdefault(realm_id, []).append(lease)
        if self._closing:  # no admission follows: give it back now
            self._return_now(realm_id)
        elif realm_id not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[realm_id] = loop.call_later(RETURN_SECONDS, self._return_now, realm_id)

    def _take_returned(self, realm_id: str) -> list[Lease]:
        timer = self._timers.pop(realm_id, None)
        if timer is not None:
            timer.cancel()
        return self._returned.pop(realm_id, None) or []

    def _return_now(self, realm_id: str) -> None:
        leases = self._take_returned(realm_id)
        if leases:
            task = asyncio.get_running_loop().create_task(self._give_back(realm_id, leases))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _give_back(self, realm_id: str, leases: list[Lease]) -> None:
        try:
            await self._pool.fetchval(
                _RELEASE, realm_id, [lease.slot for lease in leases], [lease.expires_at for lease in leases]
            )
        except Exception as exc:  # a background task: whatever failed is logged, not raised
            # The slots lapse with their leases; nothing else is lost.
            log.warning("QuickBooks throttle slots not given back (%s); they lapse", type(exc).__name__)

    async def renew(self, lease: Lease) -> None:
        """Push a long call's slot expiry out again (a long answer still streaming)."""
        if lease.slot is None or lease.released:
            return
        expires = await self._pool.fetchval(
            _RENEW, lease.realm_id, lease.slot, lease.expires_at, self._settings.quickbooks_lease_seconds
        )
        if expires is not None:
            lease.expires_at = expires

    async def pause(self, realm_id: str, seconds: float) -> None:
        """Intuit said 429: no replica sends this realm anything for `seconds`."""
        if self._reuse_seconds:
            now = asyncio.get_running_loop().time()
            # Forget the pauses that are over (a realm that pauses and then goes quiet).
            self._paused = {realm: until for realm, until in self._paused.items() if until > now}
            self._paused[realm_id] = max(self._paused.get(realm_id, now), now + seconds)
        await self._pool.execute(_PAUSE, realm_id, seconds)

    async def paused_by_intuit(self, realm_id: str, retry_after: float | None) -> None:
        """Intuit answered a call on the realm 429: pause it for its Retry-After, at least 1 s
        and at most MAX_PAUSE_SECONDS. Best effort: a pause the database cannot take is
        logged, and the call goes on as Intuit's answer says (this replica stops reusing
        slots; the others hear of the limit from Intuit)."""
        seconds = min(MAX_PAUSE_SECONDS, max(1.0, retry_after or 1.0))
        try:
            await self.pause(realm_id, seconds)
        except Exception as exc:  # noqa: BLE001 (advisory: never turns Intuit's 429 into an error)
            log.warning("QuickBooks 429: the company's pause not stored (%s)", type(exc).__name__)

    async def aclose(self) -> None:
        """Give back every slot still held here (calls finishing meanwhile included), before
        the pool closes."""
        self._closing = True
        for realm_id in list(self._timers):
            self._return_now(realm_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - loop.time()))
