"""What one admission statement of the gateway's throttle costs with the default windows: a
company's row then keeps its 500 newest admission times (4 KB), which PostgreSQL compresses.
The statement as migrated (lz4 where the server has it, migration 0011) against the same with
the column set back to pglz; one caller on a connection of its own, each admission admitted
(the minute window shortened so that it never refuses, while the row still keeps 500 times);
the two alternate, three runs each. Also the table's size after each run (1,000 warm-up and
the measured admissions, back to back: admission times further apart compress less well).

    uv run python bench/throttle_admission.py [--admissions 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from statistics import median

import asyncpg
from harness import fresh_database, print_table

from service.core.db.engine import asyncpg_dsn
from service.metering.throttle import _ADMIT

REALM = "9341450000000001"
KEPT = 500  # the default per-minute limit: as many admission times as the row keeps


async def lz4_available(conn: asyncpg.Connection) -> bool:
    try:
        await conn.execute("CREATE TEMP TABLE lz4_probe (a int[] COMPRESSION lz4)")
    except asyncpg.FeatureNotSupportedError:
        return False
    await conn.execute("DROP TABLE lz4_probe")
    return True


async def run(conn: asyncpg.Connection, compression: str, admissions: int) -> tuple[float, float, int]:
    await conn.execute(
        "ALTER TABLE quickbooks_realm_throttles "
        f"ALTER COLUMN admitted SET COMPRESSION {compression}, "
        f"ALTER COLUMN batch_admitted SET COMPRESSION {compression}"
    )
    await conn.execute("TRUNCATE quickbooks_realm_throttles")
    # realm, batch, in flight (off), per second (off), per minute, batches per minute, window
    # margin (the minute shortened to nothing: always room), lease, pace (off), slots given back.
    args = (REALM, False, 0, 0, KEPT, 0, -60.0, 60.0, 0.0, [], [])
    for _ in range(KEPT + 500):  # warm: the row full, the statement prepared
        await conn.fetchrow(_ADMIT, *args)
    times = []
    for _ in range(admissions):
        started = time.perf_counter()
        row = await conn.fetchrow(_ADMIT, *args)
        times.append(time.perf_counter() - started)
        assert row["admitted"]
    kept, method = await conn.fetchrow(
        "SELECT cardinality(admitted), pg_column_compression(admitted) FROM quickbooks_realm_throttles"
    )
    assert kept == KEPT and method == compression, (kept, method)
    size = await conn.fetchval("SELECT pg_total_relation_size('quickbooks_realm_throttles')")
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, size


Runs = dict[str, list[tuple[float, float, int]]]  # compression: (p50 µs, p99 µs, bytes) per run


async def measure(database_url: str, admissions: int) -> tuple[bool, Runs]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        has_lz4 = await lz4_available(conn)
        methods = ("lz4", "pglz") if has_lz4 else ("pglz",)
        results: Runs = {}
        for round_ in range(3):
            for method in methods if round_ % 2 == 0 else methods[::-1]:  # each goes first in turn
                results.setdefault(method, []).append(await run(conn, method, admissions))
        return has_lz4, results
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admissions", type=int, default=5000)
    args = parser.parse_args()
    with fresh_database() as database_url:
        has_lz4, results = asyncio.run(measure(database_url, args.admissions))
    if not has_lz4:
        print("this server has no lz4 (the embedded one does not): pglz only, as migration 0011 leaves it")
    print_table(
        f"One admission with {KEPT} admission times kept, one caller, {args.admissions} per run, "
        "median of 3 runs",
        ["compression", "p50 µs", "p99 µs", "table after a run", "runs (p50 µs)"],
        [
            [
                method,
                f"{median(p50 for p50, _, _ in runs):.1f}",
                f"{median(p99 for _, p99, _ in runs):.1f}",
                f"{median(size for _, _, size in runs) / 1024:.0f} KB",
                " ".join(f"{p50:.1f}" for p50, _, _ in runs),
            ]
            for method, runs in results.items()
        ],
    )


if __name__ == "__main__":
    main()
