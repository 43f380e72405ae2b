"""What a refresh costs the broker's event loop when many run at once, by connection pool layout.

One emulator (zero latency) in a process of its own; in this process, `IntuitClient` as the
broker builds it, once over a single httpx pool of 50 idle connections (how it was built before
2026-12-02, and how a plain `httpx.AsyncClient` is) and once over `SpreadTransport` (the same
connections in pools of four). Each company (one per concurrent refresh) is linked by the real
authorization-code flow; then rounds of N concurrent refreshes, each with the token the last one
returned, as a refresh storm sends them. The figure is this process's CPU time per refresh
(nothing else runs in it) and the wall time of a round; layouts alternate, twice each.

    uv run python bench/intuit_pool.py [--concurrency 50] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from statistics import median
from urllib.parse import parse_qs, urlsplit

import httpx
from harness import (
    QuickBooksAdmin,
    Server,
    broker_env,
    create_companies,
    emulator_command,
    free_port,
    print_table,
    running,
)

from service.core.config import Settings
from service.core.httpclient import SpreadTransport
from service.intuit.client import IntuitClient
from tests.support.intuit_user import sign_in_and_decide

VERIFIER = "bench-code-verifier-" + "v" * 40


async def refresh_token_of(client: IntuitClient, admin: QuickBooksAdmin) -> str:
    url = await client.authorization_url(os.urandom(8).hex(), code_verifier=VERIFIER)
    answer = await sign_in_and_decide(url, email=admin.email, follow_to_broker=False)
    assert answer.location is not None
    code = parse_qs(urlsplit(answer.location).query)["code"][0]
    return (await client.exchange_code(code, code_verifier=VERIFIER)).refresh_token


async def measure(
    settings: Settings, admins: list[QuickBooksAdmin], layout: str, rounds: int
) -> tuple[float, float]:
    limits = httpx.Limits(
        max_connections=max(100, settings.refresh_concurrency),
        max_keepalive_connections=settings.refresh_concurrency,
    )
    transport: httpx.AsyncBaseTransport = (
        httpx.AsyncHTTPTransport(limits=limits) if layout == "one pool" else SpreadTransport(limits)
    )
    client = IntuitClient(settings, transport=transport)
    try:
        tokens = [await refresh_token_of(client, admin) for admin in admins]

        async def one_round() -> None:
            answers = await asyncio.gather(*(client.refresh(token) for token in tokens))
            tokens[:] = [answer.refresh_token for answer in answers]

        for _ in range(3):  # connections open, code warm
            await one_round()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            await one_round()
        refreshes = rounds * len(admins)
        return (time.process_time() - cpu) * 1000 / refreshes, (time.perf_counter() - wall) * 1000 / rounds
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=50, help="refreshes at once (one company each)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    port = free_port()
    public = f"http://127.0.0.1:{free_port()}"
    emulator = Server(
        "emulator",
        emulator_command(port, redirect_uri=f"{public}/callback"),
        port,
        ready_path="/.well-known/openid_configuration",
    )
    env = broker_env("postgresql://unused/unused", public_url=public, emulator_url=emulator.url)
    settings = Settings(**{k: v for k, v in env.items() if k.startswith(("BROKER_", "INTUIT_"))})
    results: dict[str, list[tuple[float, float]]] = {"one pool": [], "spread": []}
    with running(emulator):
        admins = asyncio.run(create_companies(emulator.url, args.concurrency))
        for layout in ("one pool", "spread", "one pool", "spread"):
            print(f"layout: {layout}", flush=True)
            results[layout].append(asyncio.run(measure(settings, admins, layout, args.rounds)))
    print(
        f"\n{args.concurrency} refreshes at once, {args.rounds} rounds per run, emulator at zero latency; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print_table(
        "CPU of this process per refresh, and wall time per round (median of 2 runs)",
        ["layout", "CPU ms/refresh", "round ms", "runs (CPU ms)"],
        [
            [
                layout,
                f"{median(c for c, _ in runs):.2f}",
                f"{median(w for _, w in runs):.1f}",
                " ".join(f"{c:.2f}" for c, _ in runs),
            ]
            for layout, runs in results.items()
        ],
    )


if __name__ == "__main__":
    main()
