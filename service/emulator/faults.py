"""Fault injection and the counters tests read (`/_emulator/faults`, `/_emulator/stats`).

Both are process-memory only: they describe what happened to *this* run, so they are never
written to the state file and `reset` clears them.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

Endpoint = Literal["token", "revoke", "userinfo", "companyinfo", "accounting"]
FaultKind = Literal["status", "timeout", "drop_after_rotate", "drop_after_commit"]
ENDPOINTS: tuple[str, ...] = ("token", "revoke", "userinfo", "companyinfo", "accounting")
DEFAULT_TIMEOUT_S = 30.0


def new_intuit_tid() -> str:
    """An id shaped like Intuit's `intuit_tid` header (`1-<hex time>-<hex random>`)."""
    return f"1-{int(time.time()):08x}-{secrets.token_hex(12)}"


@dataclass
class Fault:
    """One queued fault: the next `remaining` calls of `endpoint` fail as `kind` says."""

    endpoint: str
    kind: str
    remaining: int
    status: int | None = None
    delay_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Faults:
    """A FIFO of faults per endpoint; each matching call consumes one unit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Fault] = []
        self.fired: Counter[str] = Counter()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._queue.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.fired.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.as_dict() for fault in self._queue]

    def take(self, endpoint: str, *, is_refresh: bool = False, is_write: bool = False) -> Fault | None:
        """Consume one unit of the first fault that applies to this call, if any.

        `drop_after_rotate` only makes sense for a refresh, so other token calls pass it by
        and leave it queued for the refresh it was meant for; likewise `drop_after_commit`
        waits for an Accounting API call that writes.
        """
        with self._lock:
            for fault in self._queue:
                if fault.endpoint != endpoint:
                    continue
                if fault.kind == "drop_after_rotate" and not is_refresh:
                    continue
                if fault.kind == "drop_after_commit" and not is_write:
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._queue.remove(fault)
                self.fired[endpoint] += 1
                return Fault(fault.endpoint, fault.kind, 1, fault.status, fault.delay_s)
            return None


class Stats:
    """Counters by endpoint and outcome, plus in-flight refreshes per realm.

    `max_concurrent_refresh` is what lets a test assert that the broker never ran two
    refreshes of one connection at once. Overlap is only observable while a request is
    inside the emulator, so tests that care set `latency_ms` > 0.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.token: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.refresh_by_realm: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.revoke: Counter[str] = Counter()
            self.userinfo: Counter[str] = Counter()
            self.companyinfo: Counter[str] = Counter()
            self.in_flight_refresh: Counter[str] = Counter()
            self.max_concurrent_refresh: dict[str, int] = {}
            self.disconnects = 0

    def count_token(self, grant_type: str, outcome: str, realm_id: str | None = None) -> None:
        with self._lock:
            self.token[grant_type][outcome] += 1
            if grant_type == "refresh_token" and realm_id is not None:
                self.refresh_by_realm[realm_id][outcome] += 1

    def count(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            counter: Counter[str] = getattr(self, endpoint)
            counter[outcome] += 1

    def count_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    @contextmanager
    def refresh_in_flight(self, realm_id: str | None) -> Iterator[None]:
        """Track one refresh of `realm_id` for as long as the request is being handled."""
        if realm_id is None:
            yield
            return
        with self._lock:
            self.in_flight_refresh[realm_id] += 1
            current = self.in_flight_refresh[realm_id]
            if current > self.max_concurrent_refresh.get(realm_id, 0):
                self.max_concurrent_refresh[realm_id] = current
        try:
            yield
        finally:
            with self._lock:
                self.in_flight_refresh[realm_id] -= 1
                if self.in_flight_refresh[realm_id] <= 0:
                    del self.in_flight_refresh[realm_id]

    def snapshot(self, faults_fired: Counter[str]) -> dict[str, Any]:
        with self._lock:
            return {
                "token": {grant: dict(outcomes) for grant, outcomes in self.token.items()},
                "refresh_by_realm": {
                    realm: dict(outcomes) for realm, outcomes in self.refresh_by_realm.items()
                },
                "revoke": dict(self.revoke),
                "userinfo": dict(self.userinfo),
                "companyinfo": dict(self.companyinfo),
                "max_concurrent_refresh": dict(self.max_concurrent_refresh),
                "in_flight_refresh": dict(self.in_flight_refresh),
                "disconnects": self.disconnects,
                "faults_fired": dict(faults_fired),
            }
