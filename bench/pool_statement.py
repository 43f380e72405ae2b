"""What one statement costs the caller through the broker's asyncpg pool (as
`service.core.db.engine.create_asyncpg_pool` builds it: no reset on release), against the same
statement on a connection of its own: wall time and this process's CPU per statement. The
statement is the smallest (`SELECT 1`), so what differs is the pool's own work (acquire,
release, its idle timer); one caller at a time, as a one-client gateway call or token read makes
them. The two alternate, three runs each.

    uv run python bench/pool_statement.py [--statements 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from statistics import median

import asyncpg
from harness import fresh_database, print_table

from service.core.db.engine import asyncpg_dsn, create_asyncpg_pool


async def per_statement(fetchval: object, statements: int) -> tuple[float, float]:
    assert callable(fetchval)
    for _ in range(500):  # warm: the statement prepared, the connection open
        await fetchval("SELECT 1")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(statements):
        await fetchval("SELECT 1")
    return (time.perf_counter() - wall) * 1e6 / statements, (time.process_time() - cpu) * 1e6 / statements


async def measure(database_url: str, statements: int) -> dict[str, list[tuple[float, float]]]:
    dsn = asyncpg_dsn(database_url)
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(3):
        pool = await create_asyncpg_pool(database_url, max_size=4)
        own = await asyncpg.connect(dsn)
        try:
            for name, fetchval in (
                ("the broker's pool", pool.fetchval),
                ("a connection of its own", own.fetchval),
            ):
                results.setdefault(name, []).append(await per_statement(fetchval, statements))
        finally:
            await own.close()
            await pool.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--statements", type=int, default=5000)
    args = parser.parse_args()
    with fresh_database() as database_url:
        results = asyncio.run(measure(database_url, args.statements))
    print_table(
        f"SELECT 1, one at a time, {args.statements} per run, median of 3 runs",
        ["through", "wall µs", "CPU µs", "runs (CPU µs)"],
        [
            [
                name,
                f"{median(w for w, _ in runs):.1f}",
                f"{median(c for _, c in runs):.1f}",
                " ".join(f"{c:.1f}" for _, c in runs),
            ]
            for name, runs in results.items()
        ],
    )


if __name__ == "__main__":
    main()
