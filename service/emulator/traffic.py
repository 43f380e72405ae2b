"""The Accounting API's front door: throttles, what callers did, metering, and `requestid`.

Throttles are Intuit's, per company (realm) and app: requests at once, per second and per
minute, and batch requests per minute (0 turns a limit off). A refused request gets 429.
Separately, `Traffic` records what each company's callers *sent* (refused requests included):
the most requests in flight at once, in any 1-second and any 60-second window, batches in any
60-second window, 429s sent, and the calls served by metering class (Intuit's App Partner
Program: `core` writes data in, `coreplus` reads data out). Like the other counters these are
process memory only, cleared by reset.

`RequestIds` remembers the answer to each write sent with `?requestid=`, per app and company,
for 24 hours (bounded), so a resent request gets the original answer instead of doing the work
twice. A resend that arrives while the first is still being handled waits for its answer.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_TTL_S = 24 * 3600
REQUEST_IDS_MAX = 10_000


@dataclass
class Limits:
    concurrent: int = 10
    per_second: int = 10
    per_minute: int = 500
    batch_per_minute: int = 120


@dataclass
class Refusal:
    reason: str  # concurrent, per_second, per_minute, batch_per_minute
    retry_after: int


@dataclass
class _Window:
    """One (realm, app) pair: what is in flight, what was admitted and what was seen."""

    in_flight: int = 0
    admitted: deque[float] = field(default_factory=deque)
    admitted_batch: deque[float] = field(default_factory=deque)
    seen: deque[float] = field(default_factory=deque)
    seen_batch: deque[float] = field(default_factory=deque)


@dataclass
class _Observed:
    requests: int = 0
    max_in_flight: int = 0
    max_per_second: int = 0
    max_per_minute: int = 0
    max_batch_per_minute: int = 0
    throttled: Counter[str] = field(default_factory=Counter)
    metering: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)


def _trim(times: deque[float], now: float, span: float) -> None:
    while times and times[0] <= now - span:
        times.popleft()


def _last_second(times: deque[float], now: float) -> tuple[int, float | None]:
    """How many of `times` fall in the last second, and the oldest of them."""
    count, oldest = 0, None
    for moment in reversed(times):
        if moment <= now - 1:
            break
        count, oldest = count + 1, moment
    return count, oldest


class Traffic:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._windows: defaultdict[tuple[str, str], _Window] = defaultdict(_Window)
            self._observed: defaultdict[str, _Observed] = defaultdict(_Observed)

    def enter(self, realm_id: str, client_id: str, limits: Limits, *, batch: bool = False) -> Refusal | None:
        """Admit one request (the caller must `leave` it) or say why it is refused."""
        with self._lock:
            now = self._clock()
            window = self._windows[(realm_id, client_id)]
            observed = self._observed[realm_id]
            # What the caller sent, refused or not.
            window.seen.append(now)
            _trim(window.seen, now, 60)
            observed.max_per_minute = max(observed.max_per_minute, len(window.seen))
            observed.max_per_second = max(observed.max_per_second, _last_second(window.seen, now)[0])
            observed.max_in_flight = max(observed.max_in_flight, window.in_flight + 1)
            if batch:
                window.seen_batch.append(now)
                _trim(window.seen_batch, now, 60)
                observed.max_batch_per_minute = max(observed.max_batch_per_minute, len(window.seen_batch))
            refusal = self._check(window, limits, now, batch)
            if refusal is not None:
                observed.throttled[refusal.reason] += 1
                return refusal
            window.in_flight += 1
            window.admitted.append(now)
            if batch:
                window.admitted_batch.append(now)
            observed.requests += 1
            return None

    @staticmethod
    def _check(window: _Window, limits: Limits, now: float, batch: bool) -> Refusal | None:
        if limits.concurrent and window.in_flight >= limits.concurrent:
            return Refusal("concurrent", 1)
        _trim(window.admitted, now, 60)
        _trim(window.admitted_batch, now, 60)
        if limits.per_second:
            count, oldest = _last_second(window.admitted, now)
            if count >= limits.per_second and oldest is not None:
                return Refusal("per_second", max(1, math.ceil(oldest + 1 - now)))
        if limits.per_minute and len(window.admitted) >= limits.per_minute:
            return Refusal("per_minute", max(1, math.ceil(window.admitted[0] + 60 - now)))
        if batch and limits.batch_per_minute and len(window.admitted_batch) >= limits.batch_per_minute:
            return Refusal("batch_per_minute", max(1, math.ceil(window.admitted_batch[0] + 60 - now)))
        return None

    def leave(self, realm_id: str, client_id: str) -> None:
        with self._lock:
            window = self._windows[(realm_id, client_id)]
            window.in_flight = max(0, window.in_flight - 1)

    def meter(self, realm_id: str, metering_class: str | None, operation: str) -> None:
        with self._lock:
            observed = self._observed[realm_id]
            observed.operations[operation] += 1
            if metering_class is not None:
                observed.metering[metering_class] += 1

    def count_throttled(self, realm_id: str, reason: str) -> None:
        """A 429 sent for another reason than a limit (an injected fault)."""
        with self._lock:
            self._observed[realm_id].throttled[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            in_flight: Counter[str] = Counter()
            for (realm_id, _client), window in self._windows.items():
                in_flight[realm_id] += window.in_flight
            return {
                realm_id: {
                    "requests": o.requests,
                    "in_flight": in_flight[realm_id],
                    "max_in_flight": o.max_in_flight,
                    "max_per_second": o.max_per_second,
                    "max_per_minute": o.max_per_minute,
                    "max_batch_per_minute": o.max_batch_per_minute,
                    "throttled": sum(o.throttled.values()),
                    "throttled_by": dict(o.throttled),
                    "core": o.metering["core"],
                    "coreplus": o.metering["coreplus"],
                    "operations": dict(o.operations),
                }
                for realm_id, o in self._observed.items()
            }


@dataclass
class Answer:
    """A rendered answer, kept byte for byte for a resent `requestid`."""

    status: int
    body: bytes
    media_type: str


@dataclass
class _Remembered:
    expires_at: float
    answer: Answer | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RequestIds:
    def __init__(
        self, clock: Callable[[], float], *, ttl: float = REQUEST_ID_TTL_S, maximum: int = REQUEST_IDS_MAX
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = maximum
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, str], _Remembered] = OrderedDict()

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    async def claim(self, key: tuple[str, str, str]) -> Answer | None:
        """The original answer to a resent request, or None: the caller now owns `key` and
        must `remember` an answer or `release` it."""
        while True:
            with self._lock:
                now = self._clock()
                while self._entries:
                    oldest_key, oldest = next(iter(self._entries.items()))
                    if oldest.expires_at > now or not oldest.done.is_set():
                        break
                    del self._entries[oldest_key]
                entry = self._entries.get(key)
                if entry is None or (entry.done.is_set() and entry.expires_at <= now):
                    self._entries[key] = _Remembered(now + self._ttl)
                    self._entries.move_to_end(key)
                    self._evict()
                    return None
                if entry.done.is_set() and entry.answer is not None:
                    return entry.answer
                if entry.done.is_set():  # the first attempt ended without an answer
                    self._entries[key] = _Remembered(now + self._ttl)
                    return None
                pending = entry.done
            await pending.wait()

    def remember(self, key: tuple[str, str, str], answer: Answer) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Remembered(self._clock() + self._ttl)
            entry.answer = answer
            entry.done.set()

    def release(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.answer is None:
                del self._entries[key]
                entry.done.set()

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            oldest_key = next(iter(self._entries))
            oldest = self._entries[oldest_key]
            if not oldest.done.is_set():
                break
            del self._entries[oldest_key]

    def __len__(self) -> int:
        return len(self._entries)
