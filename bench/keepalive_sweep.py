"""Keep-alive at scale: 100,000 connections, of which 1,000 are due (connected, keepalive_due_at
in the past); the rest are due later or in other states (some of those with a past due date).

(a) The due-work query (service.store.connections.due_connections_query, limit 500, with and
    without the access-token branch) under EXPLAIN (ANALYZE, BUFFERS): its time, and that it
    reads through an index rather than a Seq Scan on connections.
(b) The sweep: service.worker.keep_alive(runtime), run repeatedly until nothing is
    due, with a Runtime built as service/main.py's lifespan builds it, against the emulator (in
    a process of its own) answering after L ms, with BROKER_KEEPALIVE_CONCURRENCY = C. Compared
    with the target 1.5 x (due x L / C).

The due connections hold real refresh tokens: they are made through the real Connect flow over
HTTP (a broker process, the emulator's forms), concurrently; the other rows are bulk-loaded.

    uv run python bench/keepalive_sweep.py [--total 100000] [--due 1000] [--latency-ms 100]
                                           [--concurrency 8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from harness import (
    ENCRYPTION_KEY,
    Server,
    broker_env,
    connect_many,
    copy_connections,
    create_companies,
    db_connect,
    emulator_command,
    emulator_stats,
    free_port,
    fresh_database,
    print_table,
    running,
    set_emulator_config,
    uvicorn_command,
    verdict,
)
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.observability import configure_logging
from service.domain import Sealed, sealed_aad
from service.runtime import Runtime, build_runtime
from service.store.connections import due_connections_query
from service.worker import ACCESS_TOKEN_LEAD, keep_alive

QUERY_TARGET_MS = 20.0
SWEEP_FACTOR = 1.5
_INDEX_SCAN = re.compile(
    r"Index (?:Only )?Scan(?: Backward)? using (\w+) on connections"
    r"|Bitmap Index Scan on (\w+)"
)


def other_rows(count: int, box: SecretBox) -> list[tuple[Any, ...]]:
    """Rows that must not be picked: 90 % connected and due later, 4 % needing
    reauthorization with a past due date (their tokens are kept), 3 % disconnected, 3 % pending."""
    rng = random.Random(7)  # noqa: S311 - test data
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        cid = uuid.uuid4()
        kind = i % 100
        status = (
            "connected"
            if kind < 90
            else "reauthorization_required"
            if kind < 94
            else "disconnected"
            if kind < 97
            else "pending"
        )
        has_tokens = status in ("connected", "reauthorization_required")
        created = now - timedelta(days=rng.uniform(1, 400))
        if status == "connected":
            # At least two hours ahead: none may fall due while the benchmark runs.
            due: datetime | None = now + timedelta(minutes=rng.uniform(120, 24 * 60))
        elif status == "reauthorization_required":
            due = now - timedelta(minutes=rng.uniform(1, 30 * 24 * 60))
        else:
            due = None
        access = "eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0.." + secrets.token_urlsafe(130)
        rows.append(
            (
                cid,
                f"other-{i:06d}",
                status,
                f"72{i:014d}" if status != "pending" else None,
                f"Company {i}" if status != "pending" else None,
                f"user-{i:06d}",
                None,
                None,
                None,
                kind % 2 == 0,
                kind % 3 == 0,
                box.encrypt(access, sealed_aad(cid, Sealed.ACCESS)) if has_tokens else None,
                (
                    box.encrypt("AB11" + secrets.token_urlsafe(36), sealed_aad(cid, Sealed.REFRESH))
                    if has_tokens
                    else None
                ),
                now + timedelta(minutes=rng.uniform(-2 * 24 * 60, 60)) if has_tokens else None,
                now + timedelta(days=rng.uniform(10, 100)) if has_tokens else None,
                now - timedelta(hours=rng.uniform(0, 24)) if has_tokens else None,
                due,
                now - timedelta(hours=rng.uniform(0, 24)) if has_tokens else None,
                created if status != "pending" else None,
                now - timedelta(days=1) if status == "disconnected" else None,
                created,
                created,
            )
        )
    return rows


async def mark_due(database_url: str, ids: list[str]) -> None:
    db = await db_connect(database_url)
    try:
        await db.execute(
            "UPDATE connections SET keepalive_due_at = now() - random() * interval "
            "'1 hour' WHERE id = ANY($1::uuid[])",
            ids,
        )
        await db.execute("ANALYZE connections")
    finally:
        await db.close()


async def explain(database_url: str, *, include_access: bool, runs: int = 5) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the due query as the broker sends it (bound parameters),
    `runs` times; and of the generic plan a prepared statement may switch to after five runs."""
    now = datetime.now(UTC)
    access_by = now + ACCESS_TOKEN_LEAD if include_access else None
    compiled = due_connections_query(now=now, access_by=access_by, limit=500).compile(
        dialect=PGDialect_asyncpg()
    )
    params = [compiled.params[name] for name in (compiled.positiontup or [])]
    sql = str(compiled)
    db = await db_connect(database_url)
    try:
        times, plan = [], []
        for _ in range(runs):
            plan = [r[0] for r in await db.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)]
            times.append(_execution_ms(plan))
        # The broker's driver prepares its statements; after five executions PostgreSQL may
        # plan them once for any parameters, when a partial index's WHERE cannot be proven.
        await db.execute(f"PREPARE due_query AS {sql}")
        await db.execute("SET plan_cache_mode = force_generic_plan")
        literals = ", ".join(_literal(p) for p in params)
        generic = [r[0] for r in await db.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE due_query({literals})")]
    finally:
        await db.close()
    return {"sql": sql, "params": params, "plan": plan, "times": times, "generic": generic}


def _literal(value: Any) -> str:
    """SQL literal for our own parameter values (a status, a timestamp, a limit)."""
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _execution_ms(plan: list[str]) -> float:
    line = next(x for x in plan if x.startswith("Execution Time:"))
    return float(line.split()[2])


def plan_summary(plan: list[str]) -> tuple[bool, str]:
    text = "\n".join(plan)
    names = (a or b for a, b in _INDEX_SCAN.findall(text))
    return "Seq Scan on connections" in text, ", ".join(dict.fromkeys(names)) or "none"


def broker_settings(
    database_url: str, emulator_url: str, concurrency: int, pool_size: int | None
) -> Settings:
    overrides = {"BROKER_KEEPALIVE_CONCURRENCY": str(concurrency)}
    if pool_size is not None:
        overrides["BROKER_DB_POOL_SIZE"] = str(pool_size)
    env = broker_env(database_url, public_url="http://127.0.0.1:9", emulator_url=emulator_url, **overrides)
    return Settings(
        **{
            k: v
            for k, v in env.items()  # type: ignore[arg-type]
            if k.startswith(("BROKER_", "INTUIT_", "DATABASE_URL"))
        }
    )


async def sweep(
    database_url: str,
    emulator_url: str,
    *,
    concurrency: int,
    ids: list[str],
    pool_size: int | None,
    max_seconds: float,
) -> dict[str, Any]:
    """keep_alive until nothing is due, with a Runtime put together as the app's lifespan does."""
    settings = broker_settings(database_url, emulator_url, concurrency, pool_size)
    async with build_runtime(settings, database_url=database_url, change_feed=False) as runtime:
        return await _sweep(runtime, database_url, emulator_url, ids=ids, max_seconds=max_seconds)


async def _sweep(
    runtime: Runtime, database_url: str, emulator_url: str, *, ids: list[str], max_seconds: float
) -> dict[str, Any]:
    intuit = runtime.intuit
    db = await db_connect(database_url)
    try:
        await intuit.discovery()  # read once, as the first real request of a running broker would
        stats_before = await emulator_stats(emulator_url)
        cpu_before, passes, refreshed = time.process_time(), [], 0
        started = time.perf_counter()
        while time.perf_counter() - started < max_seconds:
            pass_started = time.perf_counter()
            count = await keep_alive(runtime)
            passes.append((count, time.perf_counter() - pass_started))
            refreshed += count
            if count == 0 and not await db.fetchval(
                "SELECT count(*) FROM connections WHERE status = 'connected' AND keepalive_due_at <= now()"
            ):
                break
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        stats_after = await emulator_stats(emulator_url)
        left = await db.fetchval(
            "SELECT count(*) FROM connections WHERE status = 'connected' AND keepalive_due_at <= now()"
        )
        # What became of the due set, and whether anything else was touched.
        due_set = {
            f"{r[0]}{' ' + r[1] if r[1] else ''}": r[2]
            for r in await db.fetch(
                "SELECT status, last_error_code, count(*) FROM connections "
                "WHERE id = ANY($1::uuid[]) GROUP BY 1, 2",
                ids,
            )
        }
        others = await db.fetchval(
            "SELECT count(*) FROM connections WHERE NOT id = ANY($1::uuid[]) "
            "AND updated_at >= now() - make_interval(secs => $2)",
            ids,
            seconds + 1,
        )
    finally:
        await db.close()
    outcomes = stats_after.get("token", {}).get("refresh_token", {})
    earlier = stats_before.get("token", {}).get("refresh_token", {})
    return {
        "seconds": seconds,
        "passes": passes,
        "refreshed": refreshed,
        "left": left,
        "cpu": cpu,
        "due_set": due_set,
        "others": others,
        "pool_size": runtime.settings.db_pool_size,
        "ok": outcomes.get("ok", 0) - earlier.get("ok", 0),
        "invalid_grant": outcomes.get("invalid_grant", 0) - earlier.get("invalid_grant", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total", type=int, default=100_000)
    parser.add_argument(
        "--due", type=int, default=1000, help="due connections, each made through the real Connect flow"
    )
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument(
        "--concurrency",
        default="8,16",
        help="comma-separated BROKER_KEEPALIVE_CONCURRENCY values, one sweep each",
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=16, help="Connect flows walked at once while preparing"
    )
    parser.add_argument("--max-sweep-seconds", type=float, default=600.0)
    parser.add_argument(
        "--db-pool-size",
        type=int,
        default=None,
        help="BROKER_DB_POOL_SIZE of the sweeping runtime (default: the broker's)",
    )
    parser.add_argument("--show-plans", action="store_true", help="print the full plans")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    configure_logging("WARNING")  # the runtime's warnings and errors, if any, on stderr
    box = SecretBox(Settings(BROKER_ENCRYPTION_KEYS=ENCRYPTION_KEY).parsed_encryption_keys)  # type: ignore[call-arg]

    with fresh_database() as database_url:
        emulator_port, broker_port = free_port(), free_port()
        public_url = f"http://127.0.0.1:{broker_port}"
        emulator = Server(
            "emulator",
            emulator_command(emulator_port, redirect_uri=f"{public_url}/callback"),
            emulator_port,
            ready_path="/.well-known/openid_configuration",
        )
        broker = Server(
            "broker",
            uvicorn_command("service.main:create_app", broker_port),
            broker_port,
            env=broker_env(database_url, public_url=public_url, emulator_url=emulator.url),
        )
        with running(emulator):
            with running(broker):
                admins = asyncio.run(create_companies(emulator.url, args.due))
                ids, connect_seconds = asyncio.run(
                    connect_many(broker.url, admins, concurrency=args.connect_concurrency)
                )
            print(
                f"connected {len(ids)} connections through the Connect flow in "
                f"{connect_seconds:.1f} s ({len(ids) / connect_seconds:.1f}/s, "
                f"{args.connect_concurrency} at once)",
                flush=True,
            )
            started = time.perf_counter()
            asyncio.run(copy_connections(database_url, other_rows(args.total - len(ids), box)))
            print(
                f"loaded {args.total - len(ids)} other connections in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            asyncio.run(mark_due(database_url, ids))

            plans = {flag: asyncio.run(explain(database_url, include_access=flag)) for flag in (False, True)}
            asyncio.run(set_emulator_config(emulator.url, latency_ms=args.latency_ms))
            sweeps = {}
            for n, concurrency in enumerate(concurrencies):
                if n:
                    asyncio.run(mark_due(database_url, ids))
                print(f"sweep: concurrency {concurrency}", flush=True)
                sweeps[concurrency] = asyncio.run(
                    sweep(
                        database_url,
                        emulator.url,
                        concurrency=concurrency,
                        ids=ids,
                        pool_size=args.db_pool_size,
                        max_seconds=args.max_sweep_seconds,
                    )
                )

    print(
        f"\n{args.total} connections, {len(ids)} due; emulator latency {args.latency_ms} ms; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    rows = []
    for flag, result in plans.items():
        median = statistics.median(result["times"])
        seq, indexes = plan_summary(result["plan"])
        generic_seq, generic_indexes = plan_summary(result["generic"])
        rows.append(
            [
                f"include_access={flag}",
                f"{median:.2f}",
                f"{min(result['times']):.2f}-{max(result['times']):.2f}",
                indexes,
                "yes" if seq else "no",
                f"{_execution_ms(result['generic']):.2f}",
                f"{generic_indexes}{' + Seq Scan' if generic_seq else ''}",
                verdict(median < QUERY_TARGET_MS and not seq),
            ]
        )
    print_table(
        f"(a) due-work query, limit 500 (EXPLAIN ANALYZE, 5 runs; target < "
        f"{QUERY_TARGET_MS:.0f} ms through an index)",
        [
            "query",
            "median ms",
            "range ms",
            "indexes",
            "Seq Scan on connections",
            "generic plan ms",
            "generic plan reads",
            "",
        ],
        rows,
    )
    for flag, result in plans.items():
        if args.show_plans or plan_summary(result["plan"])[0]:
            print(f"\ninclude_access={flag}: {result['sql']}\nparameters {result['params']}")
            print("\n".join(result["plan"]))
            print("generic plan:\n" + "\n".join(result["generic"]))

    rows = []
    for concurrency, result in sweeps.items():
        ideal = len(ids) * args.latency_ms / 1000 / concurrency
        target = SWEEP_FACTOR * ideal
        healthy = (
            result["ok"] == len(ids)
            and result["invalid_grant"] == 0
            and result["left"] == 0
            and result["due_set"] == {"connected": len(ids)}
            and result["others"] == 0
        )
        rows.append(
            [
                concurrency,
                result["pool_size"],
                len(result["passes"]),
                " + ".join(str(count) for count, _ in result["passes"]),
                result["ok"],
                result["invalid_grant"],
                result["left"],
                ", ".join(f"{k} {v}" for k, v in result["due_set"].items()),
                result["others"],
                f"{result['seconds']:.1f}",
                f"{ideal:.1f}",
                f"{target:.1f}",
                f"{result['cpu']:.1f}",
                verdict(result["seconds"] <= target and healthy),
            ]
        )
    print_table(
        f"(b) keep-alive sweep of {len(ids)} due connections (target {SWEEP_FACTOR} x due x L / C)",
        [
            "C",
            "DB pool",
            "passes",
            "refreshed per pass",
            "emulator refreshes",
            "invalid_grant",
            "still due",
            "due set after",
            "other rows touched",
            "seconds",
            "due x L / C",
            "target s",
            "CPU s (sweeping process)",
            "",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
