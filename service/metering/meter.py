"""Metering of Accounting API calls: the class of a call (Intuit's Core or CorePlus), how many of
each reached Intuit per tenant, realm and UTC month, and the per-tenant monthly CorePlus cap.

Counting costs a dictionary update per call: counts gather in memory and one statement adds
them to PostgreSQL every FLUSH_INTERVAL_SECONDS (`calls = calls + excluded.calls`, exact
whatever the number of replicas). README, "Usage and the CorePlus budget", says what a crash
loses and how far past its cap a tenant can get.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, get_args

import asyncpg

from service.core.aio import cancel_and_wait, shared
from service.core.config import Settings
from service.core.errors import ProblemError, database_unreachable
from service.core.metrics import (
    COREPLUS_BUDGET,
    COREPLUS_BUDGET_REFUSALS,
    COREPLUS_BUDGET_THRESHOLD,
    COREPLUS_MONTH_CALLS,
    QUICKBOOKS_CALLS,
    USAGE_FLUSH_FAILURES,
)
from service.metering import repository as repo

log = logging.getLogger(__name__)

CallClass = Literal["core", "coreplus"]
CALL_CLASSES: tuple[CallClass, ...] = get_args(CallClass)
OUTCOMES = ("ok", "client_error", "server_error", "throttled", "unauthorized", "network_error")

FLUSH_INTERVAL_SECONDS = 0.5
# A tenant's cap and total are read again by every flush while admit() asks about the tenant;
# figures older than this (the flushes failing) are read on the spot before a call is admitted.
SNAPSHOT_STALE_SECONDS = 5.0
# A tenant admit() has not asked about for this long is no longer read by the flushes.
SNAPSHOT_IDLE_SECONDS = 60.0
# A CorePlus call admitted near its tenant's cap holds a place until it is recorded, so that
# concurrent calls on one replica cannot all pass on the same count; one that never reaches
# Intuit (refused by a throttle, its token) gives its place back after this long.
ADMISSION_HOLD_SECONDS = 60.0
IN_FLIGHT_RETRY_SECONDS = 5  # Retry-After when the last places are held by calls under way
# How often the app's month total is read, for the budget gauges and thresholds.
BUDGET_CHECK_SECONDS = 5.0
BUDGET_THRESHOLDS = (80, 95, 100)  # percent of BROKER_COREPLUS_MONTHLY_BUDGET
SHUTDOWN_FLUSH_ATTEMPTS = 3

# -- classification ---------------------------------------------------------------------------

_READ_METHODS = frozenset({"GET", "HEAD"})
# Reads that Intuit also accepts as POST (a query in the body, a report, a change feed).
_READ_RESOURCES = frozenset({"query", "reports", "cdc"})
# Batch operations that put data in; anything else a batch item asks for (Query, CDCQuery, a
# report, an item the broker cannot read) is counted as a read, the class that is metered.
_WRITE_OPERATIONS = frozenset({"create", "update", "delete", "void", "send"})


def classify(method: str, path: str, body: bytes | None) -> CallClass:
    """Intuit's class of an Accounting API call; `path` is what follows /v3/company/{realm}/.

    Reads (any GET, a query, a report, CDC, CompanyInfo read) are `coreplus`; creates, updates,
    deletes, voids, sends and uploads are `core`. A batch counts once: `coreplus` if any of its
    operations reads (or its body cannot be read), else `core`.
    """
    if method.upper() in _READ_METHODS:
        return "coreplus"
    resource = path.partition("?")[0].strip("/").partition("/")[0].lower()
    if resource in _READ_RESOURCES:
        return "coreplus"
    if resource == "batch":
        return "core" if _batch_only_writes(body) else "coreplus"
    return "core"


def _batch_only_writes(body: bytes | None) -> bool:
    if not body:
        return False
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    items = document.get("BatchItemRequest") if isinstance(document, dict) else None
    if not isinstance(items, list) or not items:
        return False
    return all(
        isinstance(item, dict)
        and str(item.get("operation", "")).lower() in _WRITE_OPERATIONS
        and not any(key.endswith("Query") for key in item)
        for item in items
    )


def outcome_for_status(status: int) -> str:
    """The metering outcome of an answer Intuit sent."""
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "unauthorized"
    if status == 429:
        return "throttled"
    return "client_error" if status < 500 else "server_error"


# -- months -----------------------------------------------------------------------------------


def month_of(moment: datetime) -> date:
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class QuickBooksBudgetExhausted(ProblemError):
    status, code = 429, "quickbooks_budget_exhausted"
    title = "The tenant's QuickBooks read budget for this month is spent"


# -- the meter ----------------------------------------------------------------------------------

_Key = tuple[date, str, str, str]  # (month, call_class, tenant_id, realm_id)


@dataclass
class _TenantFigures:
    """What admit() knows of a tenant: its cap and its CorePlus calls in the database."""

    month: date
    cap: int | None
    coreplus: int
    read_at: float
    used_at: float


class Meter:
    """Counts the calls that reached Intuit and guards the tenants' CorePlus caps. One per
    process; `record` and an `admit` of known tenants never wait for the database."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._pool = pool
        self._budget = settings.coreplus_monthly_budget
        self._default_cap = settings.coreplus_tenant_monthly_cap
        self._interval = flush_interval
        self._now = now
        # Counted, not yet in the database; and, per (tenant, month), the CorePlus part of it.
        self._pending: Counter[_Key] = Counter()
        self._unflushed: Counter[tuple[str, date]] = Counter()
        # Per (tenant, month): when each admitted CorePlus call not yet recorded was admitted.
        self._admitted: dict[tuple[str, date], deque[float]] = {}
        self._figures: dict[str, _TenantFigures] = {}
        self._reading: dict[str, asyncio.Task[_TenantFigures]] = {}
        # Held by a flush and by a tenant's read: a read never sees a batch half-applied.
        self._lock = asyncio.Lock()
        self._announced: set[tuple[date, int]] = set()
        self._budget_checked_at = -math.inf
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        COREPLUS_BUDGET.set(self._budget)
        for threshold in BUDGET_THRESHOLDS:  # shown (0) before the first check
            COREPLUS_BUDGET_THRESHOLD.labels(str(threshold))

    # -- the interface of the gateway ------------------------------------------------------

    async def admit(self, tenant_id: str, realm_id: str, call_class: CallClass) -> None:
        """Raise QuickBooksBudgetExhausted (429) for a CorePlus call of a tenant at its cap."""
        if call_class != "coreplus":
            return  # Core calls are not metered by Intuit: writes always pass
        self._ensure_running()
        month = month_of(self._now())
        figures = self._figures.get(tenant_id)
        clock = time.monotonic()
        if figures is None or figures.month != month or clock - figures.read_at > SNAPSHOT_STALE_SECONDS:
            figures = await shared(
                self._reading, tenant_id, lambda: self._read_tenant(tenant_id, month, figures)
            )
        figures.used_at = clock
        if figures.cap is None:
            return
        admitted = self._admitted.setdefault((tenant_id, month), deque())
        while admitted and clock - admitted[0] > ADMISSION_HOLD_SECONDS:
            admitted.popleft()
        used = figures.coreplus + self._unflushed[(tenant_id, month)]
        if used + len(admitted) < figures.cap:
            admitted.append(clock)
            return
        COREPLUS_BUDGET_REFUSALS.inc()
        if used >= figures.cap:
            retry_after = math.ceil(
                (datetime.combine(next_month(month), datetime.min.time(), UTC) - self._now()).total_seconds()
            )
            detail = (
                f"This tenant has used its {figures.cap} QuickBooks reads (CorePlus calls) "
                f"for {month:%Y-%m}; reads resume next month, writes still pass."
            )
        else:
            retry_after = IN_FLIGHT_RETRY_SECONDS
            detail = (
                f"The last of this tenant's {figures.cap} QuickBooks reads (CorePlus calls) "
                f"for {month:%Y-%m} are under way; retry shortly, writes still pass."
            )
        raise QuickBooksBudgetExhausted(
            detail,
            headers={"Retry-After": str(max(1, retry_after))},
            tenant_id=tenant_id,
            month=f"{month:%Y-%m}",
            coreplus_cap=figures.cap,
            coreplus=used,
        )

    async def record(self, tenant_id: str, realm_id: str, call_class: CallClass, outcome: str) -> None:
        """Count one request that reached Intuit (every retry is one)."""
        if call_class not in CALL_CLASSES:
            raise ValueError(f"unknown call class {call_class!r}")
        month = month_of(self._now())
        self._pending[(month, call_class, tenant_id, realm_id)] += 1
        if call_class == "coreplus":
            self._unflushed[(tenant_id, month)] += 1
            admitted = self._admitted.get((tenant_id, month))
            if admitted:
                admitted.popleft()  # the call it admitted now counts itself
        QUICKBOOKS_CALLS.labels(call_class, outcome if outcome in OUTCOMES else "other").inc()
        self._ensure_running()

    async def aclose(self) -> None:
        """Stop flushing on a timer and write what is still counted (a few tries)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            except TimeoutError:
                await cancel_and_wait(self._task)
        for attempt in range(1, SHUTDOWN_FLUSH_ATTEMPTS + 1):
            try:
                await self.flush()
                return
            except Exception as exc:  # noqa: BLE001 (the database: try again, then report)
                if attempt == SHUTDOWN_FLUSH_ATTEMPTS:
                    log.error(
                        "usage: %d counted calls not written at shutdown (%s)",
                        sum(self._pending.values()),
                        type(exc).__name__,
                    )
                else:
                    await asyncio.sleep(0.2 * attempt)

    # -- for the app and the operators -----------------------------------------------------

    def start(self) -> None:
        self._ensure_running()

    def current_month(self) -> date:
        """The first day of the UTC month calls are counted in now."""
        return month_of(self._now())

    def forget(self, tenant_id: str) -> None:
        """Read the tenant's cap again before its next call (its cap was just changed here)."""
        self._figures.pop(tenant_id, None)

    @property
    def default_cap(self) -> int | None:
        return self._default_cap

    @property
    def budget(self) -> int:
        return self._budget

    async def flush(self) -> None:
        """Add what was counted to the database, then read the cap and total of every tenant
        admit() asks about (other replicas' calls included)."""
        async with self._lock:
            batch, self._pending = self._pending, Counter()
            clock = time.monotonic()
            for tenant_id in [
                t for t, f in self._figures.items() if clock - f.used_at > SNAPSHOT_IDLE_SECONDS
            ]:
                del self._figures[tenant_id]
            current = month_of(self._now())
            for key in [k for k, admitted in self._admitted.items() if not admitted or k[1] != current]:
                del self._admitted[key]
            if batch:
                try:
                    async with self._pool.acquire() as conn:
                        await repo.add_calls(conn, sorted(batch.items()))
                except BaseException:
                    self._pending.update(batch)  # counted again by the next flush
                    raise
                self._applied(batch)
            if self._figures:
                month = month_of(self._now())
                async with self._pool.acquire() as conn:
                    rows = await repo.tenant_figures(conn, list(self._figures), month)
                self._refreshed(rows, month, time.monotonic())

    # -- internals ---------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="qbo-broker-usage-flush")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            if self._stop.is_set():
                return  # aclose() writes the rest
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 (kept in memory; the next flush retries)
                USAGE_FLUSH_FAILURES.inc()
                log.warning("usage: counts not written yet (%s); kept for the next flush", type(exc).__name__)
            if time.monotonic() - self._budget_checked_at >= BUDGET_CHECK_SECONDS:
                try:
                    await self.check_budget()
                except Exception as exc:  # noqa: BLE001 (read again at the next check)
                    log.warning("usage: app budget not read (%s)", type(exc).__name__)

    async def check_budget(self) -> None:
        """Read the app's CorePlus calls this month into the gauges; announce each threshold
        once per month across replicas (the replica whose insert creates its row logs it)."""
        self._budget_checked_at = time.monotonic()
        month = month_of(self._now())
        async with self._pool.acquire() as conn:
            used = await repo.app_coreplus(conn, month)
            COREPLUS_MONTH_CALLS.set(used)
            reached = [t for t in BUDGET_THRESHOLDS if used * 100 >= t * self._budget]
            for threshold in BUDGET_THRESHOLDS:
                COREPLUS_BUDGET_THRESHOLD.labels(str(threshold)).set(threshold in reached)
            fresh = [t for t in reached if (month, t) not in self._announced]
            if not fresh:
                return
            claimed = await repo.claim_thresholds(conn, month, fresh, used, self._budget)
        self._announced.update((month, t) for t in fresh)
        for threshold in claimed:
            log.log(
                logging.ERROR if threshold >= 100 else logging.WARNING,
                "QuickBooks CorePlus budget: %d%% reached for %s (%d of %d calls)%s",
                threshold,
                f"{month:%Y-%m}",
                used,
                self._budget,
                "; Intuit blocks the app's reads past it" if threshold >= 100 else "",
                extra={
                    "coreplus_threshold": threshold,
                    "coreplus_calls": used,
                    "coreplus_budget": self._budget,
                },
            )

    def _applied(self, batch: Counter[_Key]) -> None:
        """A batch is in the database: move its CorePlus part from unflushed to the figures."""
        for (month, call_class, tenant_id, _), calls in batch.items():
            if call_class != "coreplus":
                continue
            self._unflushed[(tenant_id, month)] -= calls
            if self._unflushed[(tenant_id, month)] <= 0:
                del self._unflushed[(tenant_id, month)]
            figures = self._figures.get(tenant_id)
            if figures is not None and figures.month == month:
                figures.coreplus += calls

    def _refreshed(self, rows: list[repo.TenantFigures], month: date, clock: float) -> None:
        for row in rows:
            figures = self._figures.get(row.tenant_id)
            if figures is None:
                continue
            figures.month, figures.coreplus, figures.read_at = month, row.coreplus, clock
            figures.cap = row.cap if row.cap is not None else self._default_cap

    async def _read_tenant(
        self, tenant_id: str, month: date, previous: _TenantFigures | None
    ) -> _TenantFigures:
        try:
            async with self._lock, self._pool.acquire() as conn:
                (row,) = await repo.tenant_figures(conn, [tenant_id], month)
        except Exception as exc:
            if previous is None or previous.month != month or not database_unreachable(exc):
                raise
            # The flushes cannot reach the database either: go on with the last figures (they
            # still grow with this replica's own calls), rather than refuse every read.
            log.warning(
                "usage: tenant figures not read (%s); using those of %.0f s ago",
                type(exc).__name__,
                time.monotonic() - previous.read_at,
            )
            previous.read_at = time.monotonic()  # not every call waits on the outage
            return previous
        clock = time.monotonic()
        figures = _TenantFigures(
            month=month,
            coreplus=row.coreplus,
            read_at=clock,
            used_at=clock,
            cap=row.cap if row.cap is not None else self._default_cap,
        )
        self._figures[tenant_id] = figures
        return figures
