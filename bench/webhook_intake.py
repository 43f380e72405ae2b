"""POST /intuit/webhooks at a fixed arrival rate: intake latency, and the lag to the events.

The broker runs as shipped (one uvicorn worker, its background work and so the notification
processor on, in the same process) over a fresh database holding N connected companies. A load
generator in a process of its own sends signed notifications at a fixed rate (open loop: each
request leaves at its scheduled time whether or not earlier ones were answered, and latency
counts from that time, so a stall shows up in the figures instead of slowing the sender down).
The mix is Intuit's: legacy and CloudEvents bodies of one to three entity changes, a share of
them sent again (Intuit's retries), a share for companies the broker does not hold.

Two generators: wrk when installed (`--client wrk`, C, light enough to leave the CPU to the
broker), paced by bench/signed_posts.lua: each of `--connections` connections waits between its
requests so that together they offer `--rate` (the pause is shortened by the warm-up's median
latency; wrk is closed loop, so a stall lowers the rate instead of queueing, and the achieved
rate is reported beside the latency); or httpx in a process of its own (`--client httpx`), open
loop: each request leaves at its scheduled time whether or not earlier ones were answered, and
latency counts from that time. Python's client needs about as much CPU per request as the
broker, so on a small busy machine it falls behind first and measures itself: use wrk there.

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
import shutil
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


def notifications(count: int, realms: list[str], *, repeat_share: float, unknown_share: float) -> list[bytes]:
    """`count` bodies: half legacy, half CloudEvents; 1-3 changes each; some sent again."""
    rng = random.Random(7)  # noqa: S311 - test data
    bodies: list[bytes] = []
    base = datetime.now(UTC) - timedelta(minutes=5)
    for index in range(count):
        if bodies and rng.random() < repeat_share:
            bodies.append(rng.choice(bodies[-50:]))
            continue
        realm = f"55{rng.randrange(10**12):012d}" if rng.random() < unknown_share else rng.choice(realms)
        changes = []
        for part in range(rng.randint(1, 3)):
            entity, operation = rng.choice(ENTITIES), rng.choice(list(VERBS))
            when = base + timedelta(seconds=index, milliseconds=part)
            changes.append((entity, str(index * 3 + part), operation, when))
        if index % 2:
            document: Any = {
                "eventNotifications": [
                    {
                        "realmId": realm,
                        "dataChangeEvent": {
                            "entities": [
                                {
                                    "name": e,
                                    "id": i,
                                    "operation": o,
                                    "lastUpdated": w.isoformat(timespec="milliseconds"),
                                }
                                for e, i, o, w in changes
                            ]
                        },
                    }
                ]
            }
        else:
            document = [
                {
                    "specversion": "1.0",
                    "id": str(uuid.uuid4()),
                    "source": "intuit.bench",
                    "type": f"qbo.{e.lower()}.{VERBS[o]}.v1",
                    "time": w.isoformat(),
                    "datacontenttype": "application/json",
                    "intuitentityid": i,
                    "intuitaccountid": realm,
                    "data": {},
                }
                for e, i, o, w in changes
            ]
        bodies.append(json.dumps(document).encode())
    return bodies


# -- the load generator (this file run with --generate, in a process of its own) ---------------


async def generate(
    base_url: str, bodies: list[bytes], *, rate: float, warmup: float, duration: float
) -> dict[str, Any]:
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
                response = await client.post(
                    "/intuit/webhooks",
                    content=body,
                    headers={"content-type": "application/json", "intuit-signature": signature},
                )
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
    return {
        "requests": len(scheduled_ms),
        "seconds": seconds,
        "statuses": statuses,
        "scheduled_ms": scheduled_ms,
        "service_ms": service_ms,
    }


def run_wrk(
    base_url: str,
    bodies: list[bytes],
    tmp: Path,
    *,
    rate: float,
    warmup: float,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    """wrk, paced to about `rate`: a warm-up at the nominal pause, then the measured run with
    the pause less the warm-up's median latency."""
    signed = tmp / "signed.tsv"
    signed.write_text("".join(f"{sign(b)}\t{b.decode()}\n" for b in bodies))
    nominal_ms = connections * 1000 / rate

    def once(seconds: float, pause_ms: float) -> dict[str, Any]:
        output = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(Path(__file__).with_name("signed_posts.lua")),
                base_url,
                "--",
                str(signed),
                f"{pause_ms:.1f}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        line = next(x for x in output.splitlines() if x.startswith("WRK_JSON "))
        return dict(json.loads(line.removeprefix("WRK_JSON ")))

    warm = once(warmup, nominal_ms)
    pause = max(0.0, nominal_ms - warm["p50_ms"])
    measured = once(duration, pause)
    measured["pause_ms"] = pause
    measured["sent"] = warm["requests"] + measured["requests"]
    return measured


def run_generator(
    base_url: str, bodies_file: Path, *, rate: float, warmup: float, duration: float
) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--generate",
            "--base-url",
            base_url,
            "--bodies",
            str(bodies_file),
            "--rate",
            str(rate),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


# -- the benchmark -----------------------------------------------------------------------------


def server_quantiles(metrics: str, quantiles: tuple[float, ...]) -> list[str]:
    """Upper bounds of the intake's latency as the broker measured it (request in to answer
    out), from its histogram buckets: "<= X ms" per quantile."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if (
            line.startswith("qbo_broker_http_request_seconds_bucket{")
            and 'route="/intuit/webhooks"' in line
            and 'method="POST"' in line
        ):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    answers = []
    for q in quantiles:
        bound = next((b for b, count in buckets if count >= q * total), float("nan"))
        answers.append(f"<= {bound * 1000:g}")
    return answers


async def processing_figures(database_url: str, *, within: float) -> dict[str, Any]:
    """Wait (up to `within` s) until every notification is processed; lag and outcomes."""
    conn = await db_connect(database_url)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await conn.fetchval(
                "SELECT count(*) FROM intuit_notifications WHERE processed_at IS NULL"
            ):
                break
            await asyncio.sleep(0.2)
        lags = [
            row["lag"] * 1000
            for row in await conn.fetch(
                "SELECT extract(epoch FROM processed_at - received_at)::float8 AS lag "
                "FROM intuit_notifications WHERE processed_at IS NOT NULL"
            )
        ]
        outcomes = {
            row["key"]: row["n"]
            for row in await conn.fetch(
                "SELECT key, sum(value::int) AS n FROM intuit_notifications, "
                "jsonb_each_text(outcomes) GROUP BY key ORDER BY key"
            )
        }
        stored = await conn.fetchval("SELECT count(*) FROM intuit_notifications")
        left = await conn.fetchval("SELECT count(*) FROM intuit_notifications WHERE processed_at IS NULL")
        events = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'quickbooks.entity_changed'")
    finally:
        await conn.close()
    return {"lags": lags, "outcomes": outcomes, "stored": stored, "left": left, "events": events}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="notifications per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before")
    parser.add_argument("--companies", type=int, default=1000, help="connected companies")
    parser.add_argument(
        "--repeat-share", type=float, default=0.1, help="share of notifications that repeat an earlier one"
    )
    parser.add_argument(
        "--unknown-share", type=float, default=0.05, help="share for companies the broker does not hold"
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="load generator (auto: wrk if installed, else httpx)",
    )
    parser.add_argument("--connections", type=int, default=8, help="wrk's connections")
    parser.add_argument(
        "--no-processor",
        action="store_true",
        help="intake only: the broker's background work (the processor) off",
    )
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
        print(
            json.dumps(
                runner(
                    generate(
                        args.base_url, bodies, rate=args.rate, warmup=args.warmup, duration=args.duration
                    )
                )
            )
        )
        return

    with fresh_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        rows, _, _ = seed_rows(args.companies)
        asyncio.run(copy_connections(database_url, rows))
        realms = [row[3] for row in rows]
        total = int((args.warmup + args.duration) * args.rate)
        bodies = notifications(
            total, realms, repeat_share=args.repeat_share, unknown_share=args.unknown_share
        )
        bodies_file = Path(tmp) / "bodies.txt"
        bodies_file.write_text("\n".join(base64.b64encode(b).decode() for b in bodies))
        client = ("wrk" if shutil.which("wrk") else "httpx") if args.client == "auto" else args.client
        port = free_port()
        env = broker_env(
            database_url,
            public_url=f"http://127.0.0.1:{port}",
            emulator_url=UNUSED_INTUIT,
            INTUIT_WEBHOOK_VERIFIER_TOKENS=TOKEN,
            BROKER_BACKGROUND_ENABLED=str(not args.no_processor).lower(),
            BROKER_BACKGROUND_INTERVAL="3600",
        )
        broker = Server("broker", uvicorn_command("service.main:create_app", port), port, env=env)
        with running(broker):
            print(
                f"load ({client}): {args.rate:g} notifications/s, {args.warmup:g} s warm-up, "
                f"{args.duration:g} s measured",
                flush=True,
            )
            cpu_before = broker.cpu_seconds()
            if client == "wrk":
                load = run_wrk(
                    broker.url,
                    bodies,
                    Path(tmp),
                    rate=args.rate,
                    warmup=args.warmup,
                    duration=args.duration,
                    connections=args.connections,
                )
            else:
                load = run_generator(
                    broker.url, bodies_file, rate=args.rate, warmup=args.warmup, duration=args.duration
                )
            server = server_quantiles(httpx.get(f"{broker.url}/metrics", timeout=30).text, (0.5, 0.99))
            processed = asyncio.run(processing_figures(database_url, within=0 if args.no_processor else 60))
            sent = load["sent"] if client == "wrk" else total
            cpu_ms = (broker.cpu_seconds() - cpu_before) * 1000 / max(sent, 1)
            memory = broker.memory_mb()

    if client == "wrk":
        rate = load["requests"] / load["duration_s"]
        p50, p99, worst = load["p50_ms"], load["p99_ms"], load["max_ms"]
        p50_send, p99_send = "-", "-"
        failed = load["non_2xx"] + load["socket_errors"]
        note = (
            f"wrk, {args.connections} connections, each pausing {load['pause_ms']:.1f} ms "
            "between its requests; latency from each request's send"
        )
    else:
        scheduled, service = load["scheduled_ms"], load["service_ms"]
        rate = load["requests"] / load["seconds"]
        p50, p99, worst = (percentile(scheduled, 50), percentile(scheduled, 99), max(scheduled))
        p50_send, p99_send = (f"{percentile(service, 50):.2f}", f"{percentile(service, 99):.2f}")
        failed = sum(v for k, v in load["statuses"].items() if k != "200")
        note = "httpx, open loop; latency from each request's scheduled time"
    print(
        f"\n{args.companies} connected companies, one uvicorn worker "
        f"{'without' if args.no_processor else 'with'} the processor; "
        f"{total} notifications ({args.repeat_share:.0%} repeats, {args.unknown_share:.0%} "
        f"unknown companies); load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"generator: {note}")
    print_table(
        "Intake (POST /intuit/webhooks), measured part",
        [
            "requests",
            "rate /s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p50 ms from send",
            "p99 ms from send",
            "failed",
            "CPU ms/notification",
            "target p99",
            "",
        ],
        [
            [
                load["requests"],
                f"{rate:.0f}",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{worst:.1f}",
                p50_send,
                p99_send,
                failed,
                f"{cpu_ms:.2f}",
                f"<= {P99_TARGET_MS:g} ms",
                verdict(p99 <= P99_TARGET_MS and not failed and rate >= 0.95 * args.rate),
            ]
        ],
    )
    lags = processed["lags"]
    print(
        f"as the broker measured it (request in to answer out, all notifications, histogram "
        f"bucket bounds): p50 {server[0]} ms, p99 {server[1]} ms"
    )
    print_table(
        "Processing (receipt to events committed), all notifications",
        [
            "stored",
            "left unprocessed",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "entity_changed events",
            "outcomes",
        ],
        [
            [
                processed["stored"],
                processed["left"],
                f"{percentile(lags, 50):.1f}",
                f"{percentile(lags, 99):.1f}",
                f"{max(lags):.1f}" if lags else "-",
                processed["events"],
                json.dumps(processed["outcomes"]),
            ]
        ],
    )
    print(f"broker resident memory after the run: {memory[0]:.1f} MB (peak {memory[1]:.1f} MB)")


if __name__ == "__main__":
    main()
