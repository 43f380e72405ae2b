"""Metering cost: the time `Meter.admit` + `Meter.record` add to each gateway call, at p50 and
p99, against a real PostgreSQL with a warm pool; beside it, the design not chosen (one
synchronous upsert per call) measured the same way, one caller and 50 at once.

Each sample is the wall time of admit + record around a simulated Intuit call (which is not
timed: `asyncio.sleep(0)` with the callers concurrent, so flushes and other callers interleave
as they would). The buffered meter's samples include its flushes' share of the event loop only
where a flush ran inside a sample; the flush itself is reported apart.

    uv run python bench/metering_cost.py [--calls 20000] [--concurrency 50] [--tenants 100]

Uses DATABASE_URL's server when set (a database of its own, dropped after), else an embedded
PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import asyncpg
from harness import fresh_database, print_table

from service.core.config import Settings
from service.core.db.engine import create_asyncpg_pool
from service.metering import repository as repo
from service.metering.meter import CallClass, Meter, month_of

INTUIT_SECONDS = 0.005


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # µs


def workload(calls: int, tenants: int, seed: int = 7) -> list[tuple[str, str, CallClass]]:
    rng = random.Random(seed)
    classes: list[CallClass] = ["coreplus", "coreplus", "coreplus", "core"]  # reads dominate
    return [
        (f"tenant-{rng.randrange(tenants)}", f"realm-{rng.randrange(2)}", rng.choice(classes))
        for _ in range(calls)
    ]


async def drive(
    calls: list[tuple[str, str, CallClass]], concurrency: int, metered: Any
) -> tuple[list[int], float]:
    """Run `calls` over `concurrency` callers; each sample is metered()'s time in ns. Many
    callers wait INTUIT_SECONDS each for their simulated Intuit answer (so flushes run amid
    them); one caller yields but does not wait."""
    pause = INTUIT_SECONDS if concurrency > 1 else 0
    samples: list[int] = []
    queue = iter(calls)

    async def caller() -> None:
        for call in queue:
            started = time.perf_counter_ns()
            await metered(*call)
            samples.append(time.perf_counter_ns() - started)
            await asyncio.sleep(pause)  # the call to Intuit: other callers and the flusher run

    begun = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return samples, time.perf_counter() - begun


async def buffered(
    url: str, calls: list[tuple[str, str, CallClass]], concurrency: int, cap: int | None
) -> dict[str, Any]:
    pool = await create_asyncpg_pool(url, max_size=10)
    settings = Settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP=cap)  # type: ignore[call-arg]
    meter = Meter(pool, settings)
    flushes: list[float] = []
    flush = meter.flush

    async def timed_flush() -> None:
        started = time.perf_counter()
        await flush()
        flushes.append(time.perf_counter() - started)

    meter.flush = timed_flush  # type: ignore[method-assign]
    # Warm: the pool's connections open and every tenant's figures read once, as on a replica
    # that has served for a while.
    for tenant, realm, _ in {(t, r, c) for t, r, c in calls}:
        await meter.admit(tenant, realm, "coreplus")

    async def metered(tenant: str, realm: str, call_class: CallClass) -> None:
        await meter.admit(tenant, realm, call_class)
        await meter.record(tenant, realm, call_class, "ok")

    samples, seconds = await drive(calls, concurrency, metered)
    await meter.aclose()
    await pool.close()
    return {"samples": samples, "seconds": seconds, "flushes": flushes}


async def synchronous(url: str, calls: list[tuple[str, str, CallClass]], concurrency: int) -> dict[str, Any]:
    """The alternative: one upsert per call, on the reads pool, before the answer."""
    pool = await create_asyncpg_pool(url, max_size=10)
    month = month_of(await _db_now(pool))
    async with pool.acquire() as conn:  # warm: every connection opened
        await conn.execute("SELECT 1")

    async def metered(tenant: str, realm: str, call_class: CallClass) -> None:
        async with pool.acquire() as conn:
            await repo.add_calls(conn, [((month, call_class, tenant, realm), 1)])

    await asyncio.gather(*(metered("warm", "warm", "core") for _ in range(10)))
    samples, seconds = await drive(calls, concurrency, metered)
    await pool.close()
    return {"samples": samples, "seconds": seconds, "flushes": []}


async def _db_now(pool: asyncpg.Pool) -> Any:
    return await pool.fetchval("SELECT now()")


async def run(url: str, args: argparse.Namespace) -> None:
    calls = workload(args.calls, args.tenants)
    rows = []
    for label, concurrency, coro in [
        ("buffered, no cap", 1, lambda c: buffered(url, calls, c, None)),
        ("buffered, no cap", args.concurrency, lambda c: buffered(url, calls, c, None)),
        ("buffered, capped tenants", args.concurrency, lambda c: buffered(url, calls, c, 10**9)),
        ("synchronous upsert", 1, lambda c: synchronous(url, calls, c)),
        ("synchronous upsert", args.concurrency, lambda c: synchronous(url, calls, c)),
    ]:
        result = await coro(concurrency)
        samples, flushes = result["samples"], result["flushes"]
        rows.append(
            [
                label,
                concurrency,
                len(samples),
                f"{percentile(samples, 0.5):.1f}",
                f"{percentile(samples, 0.99):.1f}",
                f"{statistics.mean(samples) / 1000:.1f}",
                f"{len(samples) / result['seconds']:.0f}",
                f"{len(flushes)} / {statistics.mean(flushes) * 1000:.2f} ms" if flushes else "-",
            ]
        )
    print_table(
        f"admit + record per call, µs ({args.calls} calls, {args.tenants} tenants x 2 "
        f"realms, 3/4 CorePlus; many callers wait {INTUIT_SECONDS * 1000:.0f} ms for "
        "Intuit between calls)",
        ["design", "callers", "calls", "p50", "p99", "mean", "calls/s", "flushes / mean"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--tenants", type=int, default=100)
    args = parser.parse_args()
    with fresh_database() as url:
        asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
