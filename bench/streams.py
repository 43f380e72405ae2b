"""Live event streams: the lag from an event's commit to its arrival on every open stream, with
the streams spread over two replicas (broker processes on one database).

Each replica serves `--streams`/2 streams (`--tenants` tenants, the same number of streams
each); events are committed one by one (`--rate` a second), each for a random tenant, as the
outbox writes them; every stream of that tenant, on both replicas, must receive it. Reports the
lag at p50/p99/max, events delivered, and each replica's memory before and after the streams
opened (what a stream costs).

    uv run python bench/streams.py [--streams 400] [--tenants 20] [--events 300] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid

import httpx
from harness import (
    Server,
    broker_env,
    db_connect,
    free_port,
    fresh_database,
    print_table,
    running,
    user_headers,
    uvicorn_command,
)


async def follow(
    http: httpx.AsyncClient,
    url: str,
    tenant: str,
    user: str,
    arrivals: dict[str, list[float]],
    opened: asyncio.Event,
    ready: list[int],
    total: int,
) -> None:
    async with http.stream("GET", f"{url}/status/stream", headers=user_headers(tenant, user)) as answer:
        answer.raise_for_status()
        ready.append(1)
        if len(ready) == total:
            opened.set()
        async for line in answer.aiter_lines():
            if line.startswith("id: "):
                arrivals.setdefault(line[4:], []).append(time.perf_counter())


async def measure(
    replicas: list[str], database_url: str, *, streams: int, tenants: int, events: int, rate: float
) -> dict[str, float]:
    arrivals: dict[str, list[float]] = {}
    opened, ready = asyncio.Event(), []
    limits = httpx.Limits(max_connections=streams + 10)
    tenant_ids = [f"tenant-{i:03d}" for i in range(tenants)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits) as http:
        tasks = [
            asyncio.create_task(
                follow(
                    http,
                    replicas[i % len(replicas)],
                    tenant_ids[(i // len(replicas)) % tenants],
                    f"user-{i}",
                    arrivals,
                    opened,
                    ready,
                    streams,
                )
            )
            for i in range(streams)
        ]
        await asyncio.wait_for(opened.wait(), 60)
        conn = await db_connect(database_url)
        committed: dict[str, tuple[float, str]] = {}
        try:
            for _ in range(events):
                event_id, tenant = str(uuid.uuid4()), random.choice(tenant_ids)  # noqa: S311
                await conn.execute(
                    "INSERT INTO events (id, type, tenant_id, connection_id, data)"
                    " VALUES ($1, 'connection.modules_changed', $2, $3, $4::jsonb)",
                    uuid.UUID(event_id),
                    tenant,
                    uuid.uuid4(),
                    json.dumps({"status": "connected", "accounting_link": "enabled"}),
                )
                committed[event_id] = (time.perf_counter(), tenant)
                await asyncio.sleep(1 / rate)
            await asyncio.sleep(3)  # the last ones arrive
        finally:
            await conn.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    per_tenant = streams / tenants
    lags = [
        (arrived - at) * 1000
        for event_id, (at, _) in committed.items()
        for arrived in arrivals.get(event_id, [])
    ]
    expected = len(committed) * per_tenant
    lags.sort()
    return {
        "deliveries": len(lags),
        "expected": expected,
        "p50_ms": statistics.median(lags),
        "p99_ms": lags[int(len(lags) * 0.99) - 1],
        "max_ms": lags[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    with fresh_database() as database_url:
        servers = []
        for name in ("replica-a", "replica-b"):
            port = free_port()
            env = broker_env(
                database_url,
                public_url=f"http://127.0.0.1:{port}",
                emulator_url="http://127.0.0.1:9",
                BROKER_STREAMS_PER_TENANT="1000",
            )
            servers.append(Server(name, uvicorn_command("service.main:create_app", port), port, env=env))
        with running(*servers):
            before = [server.memory_mb()[0] for server in servers]
            result = asyncio.run(
                measure(
                    [s.url for s in servers],
                    database_url,
                    streams=args.streams,
                    tenants=args.tenants,
                    events=args.events,
                    rate=args.rate,
                )
            )
            after = [server.memory_mb()[1] for server in servers]
    print_table(
        "Commit to arrival on every open stream, two replicas",
        [
            "streams",
            "events",
            "deliveries",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "RSS before MB",
            "peak RSS MB",
        ],
        [
            [
                args.streams,
                args.events,
                f"{result['deliveries']}/{result['expected']:.0f}",
                f"{result['p50_ms']:.1f}",
                f"{result['p99_ms']:.1f}",
                f"{result['max_ms']:.1f}",
                " / ".join(f"{m:.0f}" for m in before),
                " / ".join(f"{m:.0f}" for m in after),
            ]
        ],
    )


if __name__ == "__main__":
    main()
