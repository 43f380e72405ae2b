"""POST /intuit/webhooks at a fixed arrival rate: intake latency, and the lag to the events.

The broker runs as shipped (one uvicorn worker, its background work and so the notification
processor on, in the same process) over a fresh database holding N connected companies. A load
generator in a process of its own sends signed notifications at a fixed rate (open loop: each
request leaves at its scheduled time whether or not earlier ones were answered, and latency
counts from that time, so a stall shows up in the figures instead of slowing the sender down).
The mix is Intuit's: legacy and CloudEvents bodies of one to three entity changes, a share of
them sent again (Intuit's retries), a share for companies the broker does not hold.

wrk is not used: it is a closed-loop generator (each connection waits for its answer), which
cannot hold an arrival rate; wrk2's -R is not packaged in Debian.

    uv run python bench/webhook_intake.py [--rate 200] [--duration 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from harness import (
    Server,
    broker_env,
    copy_connections,
    db_connect,
    free_port,
    fresh_database,
    percentile,
    print_table,
    running,
    uvicorn_command,
    verdict,
)
from status_token import seed_rows

TOKEN = "bench-intuit-verifier-token"  # noqa: S105 - a benchmark's own
UNUSED_INTUIT = "http://127.0.0.1:9"  # nothing here calls Intuit
P99_TARGET_MS = 50.0
ENTITIES = ("Invoice", "Customer", "Payment", "Bill", "Item")
VERBS = {"Create": "created", "Update": "updated", "Delete": "deleted", "Void": "voided"}


def sign(body: bytes) -> str:
    return base64.b64encode(hmac.new(TOKEN.encode(), body, hashlib.sha256).digest()).decode()


def notifications(count: int, realms: list[str], *, repeat_share: float,
                  unknown_share: float) -> list[bytes]:
    """`count` bodies: half legacy, half CloudEvents; 1-3 changes each; some sent again."""
    rng = random.Random(7)  # noqa: S311 - test data
    bodies: list[bytes] = []
    base = datetime.now(UTC) - timedelta(minutes=5)
    for index in range(count):
        if bodies and rng.random() < repeat_share:
            bodies.append(rng.choice(bodies[-50:]))
            continue
        realm = (f"55{rng.randrange(10**12):012d}" if rng.random() < unknown_share
                 else rng.choice(realms))
        changes = []
        for part in range(rng.randint(1, 3)):
            entity, operation = rng.choice(ENTITIES), rng.choice(list(VERBS))
            when = base + timedelta(seconds=index, milliseconds=part)
            changes.append((entity, str(index * 3 + part), operation, when))
        if index % 2:
            document: Any = {"eventNotifications": [{"realmId": realm, "dataChangeEvent": {
                "entities": [{"name": e, "id": i, "operation": o,
                              "lastUpdated": w.isoformat(timespec="milliseconds")}
                             for e, i, o, w in changes]}}]}
        else:
            document = [{"specversion": "1.0", "id": str(uuid.uuid4()), "source": "intuit.bench",
                         "type": f"qbo.{e.lower()}.{VERBS[o]}.v1", "time": w.isoformat(),
                         "datacontenttype": "application/json", "intuitentityid": i,
                         "intuitaccountid": realm, "data": {}} for e, i, o, w in changes]
        bodies.append(json.dumps(document).encode())
    return bodies


# -- the load generator (this file run with --generate, in a process of its own) ---------------

async def generate(base_url: str, bodies: list[bytes], *, rate: float, warmup: float,
                   duration: float) -> dict[str, Any]:
    signed = [(body, sign(body)) for body in bodies]
    total = int((warmup + duration) * rate)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    scheduled_ms: list[float] = []
    service_ms: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10) as client:
        start = time.perf_counter() + 0.2
        measure_from = start + warmup

        async def one(index: int) -> None:
            due = start + index / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            body, signature = signed[index % len(signed)]
            sent = time.perf_counter()
            try:
                response = await client.post("/intuit/webhooks", content=body, headers={
                    "content-type": "application/json", "intuit-signature": signature})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            done = time.perf_counter()
            if due >= measure_from:
                scheduled_ms.append((done - due) * 1000)
                service_ms.append((done - sent) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(total)))
        seconds = time.perf_counter() - measure_from
    return {"requests": len(scheduled_ms), "seconds": seconds, "statuses": statuses,
            "scheduled_ms": scheduled_ms, "service_ms": service_ms}


def run_generator(base_url: str, bodies_file: Path, *, rate: float, warmup: float,
                  duration: float) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--generate", "--base-url", base_url, "--bodies",
         str(bodies_file), "--rate", str(rate), "--warmup", str(warmup), "--duration",
         str(duration)], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


# -- the benchmark -----------------------------------------------------------------------------

async def processing_figures(database_url: str, *, within: float) -> dict[str, Any]:
    """Wait (up to `within` s) until every notification is processed; lag and outcomes."""
    conn = await db_connect(database_url)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await conn.fetchval("SELECT count(*) FROM intuit_notifications "
                                       "WHERE processed_at IS NULL"):
                break
            await asyncio.sleep(0.2)
        lags = [row["lag"] * 1000 for row in await conn.fetch(
            "SELECT extract(epoch FROM processed_at - received_at)::float8 AS lag "
            "FROM intuit_notifications WHERE processed_at IS NOT NULL")]
        outcomes = {row["key"]: row["n"] for row in await conn.fetch(
            "SELECT key, sum(value::int) AS n FROM intuit_notifications, "
            "jsonb_each_text(outcomes) GROUP BY key ORDER BY key")}
        stored = await conn.fetchval("SELECT count(*) FROM intuit_notifications")
        left = await conn.fetchval("SELECT count(*) FROM intuit_notifications "
                                   "WHERE processed_at IS NULL")
        events = await conn.fetchval("SELECT count(*) FROM events "
                                     "WHERE type = 'quickbooks.entity_changed'")
    finally:
        await conn.close()
    return {"lags": lags, "outcomes": outcomes, "stored": stored, "left": left, "events": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="notifications per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before")
    parser.add_argument("--companies", type=int, default=1000, help="connected companies")
    parser.add_argument("--repeat-share", type=float, default=0.1,
                        help="share of notifications that repeat an earlier one")
    parser.add_argument("--unknown-share", type=float, default=0.05,
                        help="share for companies the broker does not hold")
    parser.add_argument("--no-processor", action="store_true",
                        help="intake only: the broker's background work (the processor) off")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        try:
            import uvloop
        except ImportError:
            runner = asyncio.run
        else:
            runner = uvloop.run  # type: ignore[assignment]
        bodies = [base64.b64decode(line) for line in args.bodies.read_text().split()]
        print(json.dumps(runner(generate(args.base_url, bodies, rate=args.rate,
                                         warmup=args.warmup, duration=args.duration))))
        return

    with fresh_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        rows, _, _ = seed_rows(args.companies)
        asyncio.run(copy_connections(database_url, rows))
        realms = [row[3] for row in rows]
        total = int((args.warmup + args.duration) * args.rate)
        bodies_file = Path(tmp) / "bodies.txt"
        bodies_file.write_text("\n".join(base64.b64encode(b).decode() for b in notifications(
            total, realms, repeat_share=args.repeat_share, unknown_share=args.unknown_share)))
        port = free_port()
        env = broker_env(database_url, public_url=f"http://127.0.0.1:{port}",
                         emulator_url=UNUSED_INTUIT, INTUIT_WEBHOOK_VERIFIER_TOKENS=TOKEN,
                         BROKER_BACKGROUND_ENABLED=str(not args.no_processor).lower(),
                         BROKER_BACKGROUND_INTERVAL="3600")
        broker = Server("broker", uvicorn_command("service.main:create_app", port), port, env=env)
        with running(broker):
            print(f"load: {args.rate:g} notifications/s, {args.warmup:g} s warm-up, "
                  f"{args.duration:g} s measured", flush=True)
            cpu_before = broker.cpu_seconds()
            load = run_generator(broker.url, bodies_file, rate=args.rate, warmup=args.warmup,
                                 duration=args.duration)
            processed = asyncio.run(processing_figures(
                database_url, within=0 if args.no_processor else 60))
            cpu_ms = (broker.cpu_seconds() - cpu_before) * 1000 / max(total, 1)
            memory = broker.memory_mb()

    scheduled, service = load["scheduled_ms"], load["service_ms"]
    non_200 = {k: v for k, v in load["statuses"].items() if k != "200"}
    p99 = percentile(scheduled, 99)
    print(f"\n{args.companies} connected companies, one uvicorn worker "
          f"{'without' if args.no_processor else 'with'} the processor; "
          f"{total} notifications ({args.repeat_share:.0%} repeats, {args.unknown_share:.0%} "
          f"unknown companies); load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table("Intake (POST /intuit/webhooks), measured part", [
        "requests", "rate /s", "p50 ms", "p99 ms", "max ms", "p50 ms from send",
        "p99 ms from send", "non-200", "CPU ms/notification", "target p99", ""],
        [[load["requests"], f"{load['requests'] / load['seconds']:.0f}",
          f"{percentile(scheduled, 50):.2f}", f"{p99:.2f}", f"{max(scheduled):.1f}",
          f"{percentile(service, 50):.2f}", f"{percentile(service, 99):.2f}",
          json.dumps(non_200) if non_200 else 0, f"{cpu_ms:.2f}", f"<= {P99_TARGET_MS:g} ms",
          verdict(p99 <= P99_TARGET_MS and not non_200)]])
    lags = processed["lags"]
    print_table("Processing (receipt to events committed), all notifications", [
        "stored", "left unprocessed", "lag p50 ms", "lag p99 ms", "lag max ms",
        "entity_changed events", "outcomes"],
        [[processed["stored"], processed["left"], f"{percentile(lags, 50):.1f}",
          f"{percentile(lags, 99):.1f}", f"{max(lags):.1f}" if lags else "-",
          processed["events"], json.dumps(processed["outcomes"])]])
    print(f"broker resident memory after the run: {memory[0]:.1f} MB (peak {memory[1]:.1f} MB)")


if __name__ == "__main__":
    main()
