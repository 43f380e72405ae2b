"""Does the gateway keep a company within Intuit's limits across replicas, without wasting them?

Two broker processes on one PostgreSQL, one emulator enforcing Intuit's limits (10 in flight,
10 per second, 500 per minute); N concurrent callers (half on each broker) send reads of one
company for D seconds, each starting its next call as soon as the last one ends (a throttled
one included). The emulator reports what it saw: most requests in flight at once, in any second,
in any 60-second window, and 429s it sent. The load starts as soon as the company is linked:
the Connect flow's CompanyInfo read went through the same throttle, and counts in its windows.

    uv run python bench/throttle_fidelity.py [--callers 50] [--duration 65] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter

import httpx
from harness import (
    Server,
    broker_env,
    connect_through_flow,
    create_companies,
    emulator_command,
    emulator_stats,
    free_port,
    fresh_database,
    new_api_key,
    print_table,
    running,
    set_emulator_config,
    uvicorn_command,
    verdict,
)

PER_MINUTE = 500
USED_TARGET = 0.95


async def load(urls: list[str], path: str, key: str, *, callers: int, duration: float) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    clients = [
        httpx.AsyncClient(
            base_url=url,
            timeout=60,
            limits=httpx.Limits(max_connections=callers, max_keepalive_connections=callers),
        )
        for url in urls
    ]
    stop_at = time.monotonic() + duration

    async def caller(index: int) -> None:
        http = clients[index % len(clients)]
        while time.monotonic() < stop_at:
            try:
                response = await http.get(path, headers={"X-API-Key": key})
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                continue
            code = (
                response.json().get("code")
                if response.status_code >= 400
                and response.headers.get("content-type") == "application/problem+json"
                else None
            )
            outcomes[f"{response.status_code} {code}" if code else str(response.status_code)] += 1

    try:
        await asyncio.gather(*(caller(i) for i in range(callers)))
    finally:
        for http in clients:
            await http.aclose()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--duration", type=float, default=65.0)
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=20,
        help="the emulator's answer time (Intuit's is tens to hundreds of ms)",
    )
    args = parser.parse_args()

    with fresh_database() as database_url:
        ports = [free_port(), free_port()]
        emulator_port = free_port()
        emulator = Server(
            "emulator",
            emulator_command(emulator_port, redirect_uri=f"http://127.0.0.1:{ports[0]}/callback"),
            emulator_port,
            ready_path="/.well-known/openid_configuration",
        )
        brokers = [
            Server(
                f"broker{i}",
                uvicorn_command("service.main:create_app", port),
                port,
                env=broker_env(
                    database_url, public_url=f"http://127.0.0.1:{ports[0]}", emulator_url=emulator.url
                ),
            )
            for i, port in enumerate(ports)
        ]
        with running(emulator, *brokers):
            admin = asyncio.run(create_companies(emulator.url, 1))[0]

            async def link() -> tuple[str, str]:
                async with httpx.AsyncClient(base_url=brokers[0].url, timeout=60) as http:
                    connection_id = await connect_through_flow(
                        http, tenant="tenant-bench", user="user-bench", admin=admin
                    )
                return connection_id, await new_api_key(database_url, "quickbooks:read")

            connection_id, key = asyncio.run(link())
            asyncio.run(set_emulator_config(emulator.url, latency_ms=args.latency_ms))
            print(f"load: {args.callers} callers on two brokers for {args.duration:g} s", flush=True)
            outcomes = asyncio.run(
                load(
                    [b.url for b in brokers],
                    f"/connections/{connection_id}/quickbooks/customer/1",
                    key,
                    callers=args.callers,
                    duration=args.duration,
                )
            )
            seen = asyncio.run(emulator_stats(emulator.url))["accounting"][admin.realm_id]

    print(
        f"\n{args.callers} callers, two brokers, one company, {args.duration:g} s, emulator "
        f"latency {args.latency_ms} ms; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print_table("Answers the callers got", ["answer", "count"], sorted(outcomes.items()))
    used = seen["max_per_minute"] / PER_MINUTE
    print_table(
        "What the emulator (Intuit) saw",
        ["figure", "value", "limit", ""],
        [
            ["requests served", seen["requests"], "", ""],
            ["max in flight", seen["max_in_flight"], "<= 10", verdict(seen["max_in_flight"] <= 10)],
            ["max in any 1 s", seen["max_per_second"], "<= 10", verdict(seen["max_per_second"] <= 10)],
            [
                "max in any 60 s",
                seen["max_per_minute"],
                f"<= {PER_MINUTE}",
                verdict(seen["max_per_minute"] <= PER_MINUTE),
            ],
            ["429s sent", seen["throttled"], "0", verdict(seen["throttled"] == 0)],
            ["share of 500/min used", f"{used:.1%}", f">= {USED_TARGET:.0%}", verdict(used >= USED_TARGET)],
        ],
    )


if __name__ == "__main__":
    main()
