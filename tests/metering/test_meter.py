"""The Meter against a real PostgreSQL: exact counts from concurrent replicas (Meters with pools
of their own, and separate processes), the per-tenant cap, months, the budget thresholds."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from service.core.config import Settings
from service.core.db.engine import asyncpg_dsn, create_asyncpg_pool
from service.core.metrics import COREPLUS_BUDGET_THRESHOLD, COREPLUS_MONTH_CALLS, QUICKBOOKS_CALLS
from service.metering.meter import Meter, QuickBooksBudgetExhausted, month_of
from tests.support.logs import captured_json_logs
from tests.support.processes import REPO_ROOT, process_env

TABLES = "quickbooks_usage, quickbooks_budgets, quickbooks_budget_alerts"
DECEMBER = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)


def settings(**values: Any) -> Settings:
    return Settings(**values)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    await conn.execute(f"TRUNCATE {TABLES}")
    yield conn
    await conn.close()


@pytest.fixture
async def meters(database_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Meters as replicas have them: each on a pool of its own; closed (flushed) at the end."""
    made: list[tuple[Meter, asyncpg.Pool]] = []

    async def make(config: Settings | None = None, **kwargs: Any) -> Meter:
        pool = await create_asyncpg_pool(database_url, max_size=4)
        meter = Meter(pool, config or settings(), **kwargs)
        made.append((meter, pool))
        return meter

    yield make
    for meter, pool in made:
        await meter.aclose()
        await pool.close()


async def stored(conn: asyncpg.Connection) -> Counter[tuple[str, str, str, str]]:
    rows = await conn.fetch("SELECT month, call_class, tenant_id, realm_id, calls FROM quickbooks_usage")
    return Counter(
        {(f"{r['month']:%Y-%m}", r["call_class"], r["tenant_id"], r["realm_id"]): r["calls"] for r in rows}
    )


def mixed_calls(seed: int, count: int) -> list[tuple[str, str, str, str]]:
    rng = random.Random(seed)
    return [
        (
            f"tenant-{rng.randrange(5)}",
            f"realm-{rng.randrange(3)}",
            rng.choice(["core", "coreplus"]),
            rng.choice(["ok", "ok", "ok", "client_error", "throttled", "network_error"]),
        )
        for _ in range(count)
    ]


async def test_counts_are_exact_after_concurrent_calls_on_two_replicas(db, meters) -> None:
    # Flushing every 5 ms: the two replicas' upserts of the same rows overlap many times.
    first, second = await meters(flush_interval=0.005), await meters(flush_interval=0.005)
    calls = mixed_calls(seed=1, count=2000)
    before = QUICKBOOKS_CALLS.labels("coreplus", "throttled")._value.get()

    async def one(index: int, call: tuple[str, str, str, str]) -> None:
        await asyncio.sleep(random.random() * 0.3)  # spread over many flushes
        meter = first if index % 2 else second
        await meter.admit(call[0], call[1], call[2])  # type: ignore[arg-type]
        await meter.record(*call)  # type: ignore[arg-type]

    await asyncio.gather(*(one(i, call) for i, call in enumerate(calls)))
    await first.aclose()
    await second.aclose()

    month = f"{datetime.now(UTC):%Y-%m}"
    expected = Counter((month, cls, tenant, realm) for tenant, realm, cls, _ in calls)
    assert await stored(db) == expected
    assert sum(expected.values()) == 2000
    throttled = sum(1 for *_, cls, outcome in calls if cls == "coreplus" and outcome == "throttled")
    assert QUICKBOOKS_CALLS.labels("coreplus", "throttled")._value.get() - before == throttled


async def test_counts_are_exact_from_two_processes(db, database_url: str) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.meter_process",
            database_url,
            str(seed),
            "1000",
            cwd=REPO_ROOT,
            env=process_env({}),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for seed in (11, 12)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in processes)), 120)
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
    month = f"{datetime.now(UTC):%Y-%m}"
    expected: Counter[tuple[str, str, str, str]] = Counter()
    for out, _ in outputs:
        expected.update((month, cls, tenant, realm) for tenant, realm, cls in json.loads(out))
    assert sum(expected.values()) == 2000
    assert await stored(db) == expected


async def test_a_tenant_at_its_cap_is_refused_reads_but_not_writes(db, meters) -> None:
    now = DECEMBER
    meter = await meters(settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="3"), now=lambda: now)
    for _ in range(3):
        await meter.admit("tenant-a", "r1", "coreplus")
        await meter.record("tenant-a", "r1", "coreplus", "ok")
    with pytest.raises(QuickBooksBudgetExhausted) as refused:
        await meter.admit("tenant-a", "r2", "coreplus")  # any realm of the tenant
    problem = refused.value
    assert (problem.status, problem.code) == (429, "quickbooks_budget_exhausted")
    # Until 2027-01-01T00:00Z: 16.5 days.
    assert problem.headers["Retry-After"] == str(16 * 86400 + 12 * 3600)
    assert problem.body()["coreplus_cap"] == 3
    await meter.admit("tenant-a", "r1", "core")  # writes pass
    await meter.admit("tenant-b", "r1", "coreplus")  # another tenant has its own count
    # Reads resume in the new month.
    now = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)
    await meter.admit("tenant-a", "r1", "coreplus")


async def test_no_cap_by_default(db, meters) -> None:
    meter = await meters()
    for _ in range(50):
        await meter.record("tenant-a", "r1", "coreplus", "ok")
    await meter.flush()
    await meter.admit("tenant-a", "r1", "coreplus")


async def test_a_replica_sees_the_calls_of_another(db, meters) -> None:
    config = settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="10")
    first, second = await meters(config), await meters(config)
    await second.admit("tenant-a", "r1", "coreplus")  # second now follows tenant-a
    for _ in range(10):
        await first.record("tenant-a", "r1", "coreplus", "ok")
    await second.admit("tenant-a", "r1", "coreplus")  # first has not flushed yet
    await first.flush()
    await second.flush()  # reads the tenant's figures again
    with pytest.raises(QuickBooksBudgetExhausted):
        await second.admit("tenant-a", "r1", "coreplus")
    # A replica that never saw the tenant reads its figures before the first call.
    third = await meters(config)
    with pytest.raises(QuickBooksBudgetExhausted):
        await third.admit("tenant-a", "r9", "coreplus")


async def test_a_tenants_own_cap_overrides_the_default(db, meters) -> None:
    meter = await meters(settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="100"))
    await db.execute(
        "INSERT INTO quickbooks_budgets (tenant_id, coreplus_monthly_cap, "
        "updated_by) VALUES ('tenant-a', 0, 'test')"
    )
    with pytest.raises(QuickBooksBudgetExhausted):
        await meter.admit("tenant-a", "r1", "coreplus")
    await meter.admit("tenant-b", "r1", "coreplus")  # the default
    # Removed: the default applies again, on the next read of the tenant's figures.
    await db.execute("DELETE FROM quickbooks_budgets")
    await meter.flush()
    await meter.admit("tenant-a", "r1", "coreplus")


async def test_calls_are_counted_in_their_utc_month(db, meters) -> None:
    now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    meter = await meters(now=lambda: now)
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    now = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    await meter.record("tenant-a", "r1", "core", "ok")
    await meter.flush()
    assert await stored(db) == Counter(
        {
            ("2026-11", "coreplus", "tenant-a", "r1"): 1,
            ("2026-12", "coreplus", "tenant-a", "r1"): 1,
            ("2026-12", "core", "tenant-a", "r1"): 1,
        }
    )


async def test_counts_kept_when_a_flush_fails_are_written_by_the_next(db, meters, database_url: str) -> None:
    meter = await meters(flush_interval=3600)  # flushed by the test alone
    for _ in range(7):
        await meter.record("tenant-a", "r1", "core", "ok")
    await db.execute("ALTER TABLE quickbooks_usage RENAME TO quickbooks_usage_away")
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await meter.flush()
        await meter.record("tenant-a", "r1", "core", "ok")
    finally:
        await db.execute("ALTER TABLE quickbooks_usage_away RENAME TO quickbooks_usage")
    await meter.flush()
    month = f"{datetime.now(UTC):%Y-%m}"
    assert await stored(db) == Counter({(month, "core", "tenant-a", "r1"): 8})


async def test_each_budget_threshold_is_logged_once_across_replicas(db, meters) -> None:
    config = settings(BROKER_COREPLUS_MONTHLY_BUDGET="20")
    # Checked by the test alone (not by the meters' timers).
    first, second = await meters(config, flush_interval=3600), await meters(config, flush_interval=3600)
    for _ in range(16):
        await first.record("tenant-a", "r1", "coreplus", "ok")
    await first.flush()
    with captured_json_logs(logging.WARNING) as logs:
        await asyncio.gather(first.check_budget(), second.check_budget())
        await asyncio.gather(first.check_budget(), second.check_budget())
        assert COREPLUS_MONTH_CALLS._value.get() == 16
        assert COREPLUS_BUDGET_THRESHOLD.labels("80")._value.get() == 1
        assert COREPLUS_BUDGET_THRESHOLD.labels("95")._value.get() == 0
        for _ in range(4):
            await second.record("tenant-b", "r2", "coreplus", "ok")
        await second.flush()
        await asyncio.gather(first.check_budget(), second.check_budget())
        third = await meters(config, flush_interval=3600)  # a replica started later announces nothing again
        await third.check_budget()
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    announced = [line["coreplus_threshold"] for line in lines if "coreplus_threshold" in line]
    assert sorted(announced) == [80, 95, 100]
    assert COREPLUS_BUDGET_THRESHOLD.labels("100")._value.get() == 1
    rows = await db.fetch("SELECT month, threshold FROM quickbooks_budget_alerts ORDER BY 2")
    month = month_of(datetime.now(UTC))
    assert [(r["month"], r["threshold"]) for r in rows] == [(month, 80), (month, 95), (month, 100)]
    # Each published once, for the whole app, in the statement that claimed it.
    events = await db.fetch(
        "SELECT tenant_id, connection_id, data FROM events "
        "WHERE type = 'quickbooks.usage_threshold' ORDER BY seq"
    )
    assert [(e["tenant_id"], e["connection_id"]) for e in events] == [("*", None)] * 3
    published = [json.loads(e["data"]) for e in events]
    assert sorted(d["threshold_percent"] for d in published) == [80, 95, 100]
    assert {(d["month"], d["coreplus_budget"]) for d in published} == {(f"{month:%Y-%m}", 20)}


async def test_with_the_database_unreachable_known_tenants_keep_their_figures(
    db, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.core.errors import database_unreachable
    from service.metering import meter as metering

    pool = await create_asyncpg_pool(database_url, max_size=2)
    meter = Meter(pool, settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="2"), flush_interval=3600)
    await meter.admit("tenant-a", "r1", "coreplus")  # figures read
    await pool.close()  # the database gone, for this replica
    monkeypatch.setattr(metering, "SNAPSHOT_STALE_SECONDS", 0.0)  # every admit wants a new read
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    await meter.admit("tenant-a", "r1", "coreplus")  # the last figures, and its own call
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    with pytest.raises(QuickBooksBudgetExhausted):
        await meter.admit("tenant-a", "r1", "coreplus")  # still counting while it cannot write
    # A tenant it knows nothing of: the database's own error (answered 503 by the app).
    with pytest.raises(Exception) as unknown:
        await meter.admit("tenant-b", "r1", "coreplus")
    assert database_unreachable(unknown.value)
    await meter.admit("tenant-b", "r1", "core")  # writes need no figures
    with captured_json_logs(logging.ERROR) as logs:
        await meter.aclose()  # tries to write, and says what it could not
    assert "2 counted calls not written at shutdown" in logs.getvalue()


async def test_concurrent_calls_on_one_replica_cannot_pass_the_cap_together(db, meters) -> None:
    meter = await meters(settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="10"))
    await meter.admit("tenant-a", "r1", "core")  # (reads nothing: writes are not metered)
    outcomes: list[str] = []

    async def call() -> None:
        try:
            await meter.admit("tenant-a", "r1", "coreplus")
        except QuickBooksBudgetExhausted as refused:
            outcomes.append(f"refused {refused.headers['Retry-After']}")
            return
        outcomes.append("admitted")
        await asyncio.sleep(0.05)  # at Intuit
        await meter.record("tenant-a", "r1", "coreplus", "ok")

    await asyncio.gather(*(call() for _ in range(50)))
    assert outcomes.count("admitted") == 10
    # Refused while the last ten were under way: retry shortly, they may still fail.
    assert outcomes.count("refused 5") == 40
    with pytest.raises(QuickBooksBudgetExhausted) as spent:
        await meter.admit("tenant-a", "r1", "coreplus")
    assert int(spent.value.headers["Retry-After"]) > 5  # until the next month


async def test_an_admitted_call_that_never_reached_intuit_gives_its_place_back(
    db, meters, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.metering import meter as metering

    meter = await meters(settings(BROKER_COREPLUS_TENANT_MONTHLY_CAP="1"))
    await meter.admit("tenant-a", "r1", "coreplus")  # then refused by a throttle, say
    with pytest.raises(QuickBooksBudgetExhausted):
        await meter.admit("tenant-a", "r1", "coreplus")
    monkeypatch.setattr(metering, "ADMISSION_HOLD_SECONDS", -1.0)  # its hold has run out
    await meter.admit("tenant-a", "r1", "coreplus")
