"""Webhook delivery: events committed to the outbox, delivered by a broker process to three
local receivers (each a uvicorn process of its own).

(a) Burst: N events (default 10,000), committed through service.events.outbox.emit in
    transactions of B (default 100) as fast as this process can, every endpoint subscribed to
    all of them: deliveries per second from the first commit to the last delivery, and the lag
    from each event's commit to its arrival at each receiver, p50 / p99 / max. This lag is
    mostly queueing behind the burst.
(b) Paced: M events (default 2,000), one per transaction, at R per second (default 200, below
    what (a) shows the sender sustains): the lag a single event sees when the sender keeps up.

The broker runs as shipped (`uvicorn service.main:create_app`), its background work on, so its
webhook sender wakes on the events channel; BROKER_WEBHOOK_ALLOW_PRIVATE=true lets it send to
127.0.0.1 over plain http. Lag is measured on one clock (this host's wall clock): the time
after COMMIT returned here, to the time the receiver process read the request.

    uv run python bench/webhook_delivery.py [--events 10000] [--batch 100] [--paced 2000]
                                            [--rate 200] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import httpx
from harness import (
    BENCH_DIR,
    Server,
    broker_env,
    free_port,
    fresh_database,
    new_api_key,
    percentile,
    print_table,
    running,
    uvicorn_command,
)

from service.core.db.engine import build_engine, build_sessionmaker
from service.events import outbox

ENDPOINTS = 3


def create_receiver() -> Any:
    """A receiver: answers 204 at once and remembers when each webhook-id first arrived."""
    arrived: dict[str, float] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        now = time.time()
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "POST":
            for key, value in scope["headers"]:
                if key == b"webhook-id":
                    arrived.setdefault(value.decode(), now)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"{}" if scope["path"] == "/healthz" else json.dumps(arrived).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def arrivals(receivers: list[Server]) -> list[dict[str, float]]:
    async with httpx.AsyncClient(timeout=30) as http:
        return [(await http.get(f"{r.url}/arrivals")).json() for r in receivers]


async def wait_for(
    receivers: list[Server], committed: dict[str, float], within: float
) -> list[dict[str, float]]:
    """Each receiver's arrivals of the committed events, once all arrived (or time is up)."""
    deadline = time.monotonic() + within
    while True:
        got = [{k: v for k, v in g.items() if k in committed} for g in await arrivals(receivers)]
        if sum(len(g) for g in got) >= ENDPOINTS * len(committed) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.5)


async def commit_events(database_url: str, count: int, *, batch: int, rate: float | None) -> dict[str, float]:
    """Commit `count` events, `batch` per transaction (at `rate` per second if given); each
    event id with the time its COMMIT returned."""
    engine = build_engine(database_url, pool_size=2)
    sessionmaker = build_sessionmaker(engine)
    committed: dict[str, float] = {}
    started = time.monotonic()
    try:
        for first in range(0, count, batch):
            if rate is not None:
                await asyncio.sleep(max(0.0, started + first / rate - time.monotonic()))
            ids = []
            async with sessionmaker() as session, session.begin():
                for _ in range(min(batch, count - first)):
                    ids.append(
                        await outbox.emit(
                            session,
                            outbox.CONNECTION_MODULES_CHANGED,
                            tenant_id="bench-tenant",
                            connection_id=uuid.uuid4(),
                            data={
                                "status": "connected",
                                "accounting_link": "enabled",
                                "modules": {"accounts_receivable": True, "accounts_payable": False},
                            },
                        )
                    )
            now = time.time()
            committed.update((str(i), now) for i in ids)
    finally:
        await engine.dispose()
    return committed


def lags(committed: dict[str, float], got: list[dict[str, float]]) -> list[float]:
    return [
        (seen[event_id] - at) * 1000 for seen in got for event_id, at in committed.items() if event_id in seen
    ]


async def run(args: argparse.Namespace, database_url: str) -> None:
    ports = [free_port() for _ in range(ENDPOINTS)]
    receiver_servers = [
        Server(
            f"receiver{i}", uvicorn_command("webhook_delivery:create_receiver", port, app_dir=BENCH_DIR), port
        )
        for i, port in enumerate(ports)
    ]
    broker_port = free_port()
    broker = Server(
        "broker",
        uvicorn_command("service.main:create_app", broker_port),
        broker_port,
        env=broker_env(
            database_url,
            public_url=f"http://127.0.0.1:{broker_port}",
            emulator_url="http://127.0.0.1:9",
            BROKER_BACKGROUND_ENABLED="true",
            BROKER_WEBHOOK_ALLOW_PRIVATE="true",
            BROKER_WEBHOOK_CONCURRENCY_PER_ENDPOINT=str(args.concurrency),
            BROKER_DB_POOL_SIZE="10",
        ),
    )
    key = await new_api_key(database_url, "webhooks:write")
    with running(*receiver_servers, broker):
        async with httpx.AsyncClient(base_url=broker.url, timeout=30, headers={"X-API-Key": key}) as http:
            for server in receiver_servers:
                answer = await http.post("/webhook-endpoints", json={"url": f"{server.url}/hooks"})
                answer.raise_for_status()
        rows = []
        for name, count, batch, rate in [
            ("(a) burst", args.events, args.batch, None),
            ("(b) paced", args.paced, 1, args.rate),
        ]:
            cpu_before = broker.cpu_seconds()
            started = time.time()
            committed = await commit_events(database_url, count, batch=batch, rate=rate)
            committing = time.time() - started
            got = await wait_for(receiver_servers, committed, within=args.timeout)
            delivered = sum(len(g) for g in got)
            last = max((max(g.values()) for g in got if g), default=started)
            cpu = broker.cpu_seconds() - cpu_before
            lag = lags(committed, got)
            rows.append(
                [
                    name,
                    count,
                    batch,
                    f"{count / committing:.0f}",
                    delivered,
                    f"{delivered / (last - started):.0f}",
                    f"{percentile(lag, 50):.0f}",
                    f"{percentile(lag, 99):.0f}",
                    f"{max(lag, default=float('nan')):.0f}",
                    f"{cpu * 1000 / max(delivered, 1):.2f}",
                ]
            )
        print_table(
            f"webhook delivery to {ENDPOINTS} local endpoints (per-endpoint concurrency {args.concurrency})",
            [
                "run",
                "events",
                "per txn",
                "events/s committed",
                "deliveries",
                "deliveries/s",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "broker CPU ms/delivery",
            ],
            rows,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--paced", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    with fresh_database() as database_url:
        asyncio.run(run(args, database_url))


if __name__ == "__main__":
    main()
