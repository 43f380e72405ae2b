"""A replica's Meter in a process of its own: `python -m tests.support.meter_process URL SEED N`
records N seeded, mixed calls concurrently, closes the Meter (which writes what is left) and
prints the calls it recorded as JSON."""

from __future__ import annotations

import asyncio
import json
import random
import sys

from service.core.config import Settings
from service.core.db.engine import create_asyncpg_pool
from service.metering.meter import Meter


async def main(database_url: str, seed: int, count: int) -> None:
    pool = await create_asyncpg_pool(database_url, max_size=4)
    meter = Meter(pool, Settings(), flush_interval=0.005)  # flushes overlap the other process's
    rng = random.Random(seed)
    calls = [
        (f"tenant-{rng.randrange(5)}", f"realm-{rng.randrange(3)}", rng.choice(["core", "coreplus"]))
        for _ in range(count)
    ]

    async def one(call: tuple[str, str, str]) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        await meter.record(call[0], call[1], call[2], "ok")  # type: ignore[arg-type]

    await asyncio.gather(*(one(call) for call in calls))
    await meter.aclose()
    await pool.close()
    print(json.dumps(calls))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
