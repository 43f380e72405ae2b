"""GET /status and GET /connections/{id}/token under load: the broker against a raw baseline.

The broker runs as one uvicorn worker in a process of its own, over a database of N tenants
(one connected connection each, with real AES-GCM ciphertexts); bench/raw_app.py, a bare
Starlette + asyncpg app doing the same lookups, runs beside it the same way. A separate load
generator (wrk, or httpx tasks) sends the same requests to each in turn, in rounds that
alternate which server goes first: random tenants for /status, random connections for the
token. Reports throughput, p50/p99, the broker/raw ratio of each round and their median (one
slow moment of a shared machine then moves one round, not the verdict), and the broker worker's
memory after the run.

    uv run python bench/status_token.py [--tenants 10000] [--concurrency 32] [--duration 5]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from harness import (
    BENCH_DIR,
    ENCRYPTION_KEY,
    Server,
    broker_env,
    copy_connections,
    free_port,
    fresh_database,
    new_api_key,
    print_table,
    running,
    user_headers,
    uvicorn_command,
    verdict,
)
from loadgen import LoadResult, pick_client, run_load

from service.core.config import Settings
from service.core.crypto import SecretBox
from service.domain import Sealed, sealed_aad

STATUS_TARGET, TOKEN_TARGET = 1.0, 0.8  # broker throughput as a share of raw's
MEMORY_TARGET_MB = 150.0
UNUSED_INTUIT = "http://127.0.0.1:9"  # fresh tokens only: Intuit is never called


def seed_rows(tenants: int) -> tuple[list[tuple[Any, ...]], list[str], list[str]]:
    """One connected connection per tenant, sealed exactly as service/tokens/credentials.py does."""
    box = SecretBox(Settings(BROKER_ENCRYPTION_KEYS=ENCRYPTION_KEY).parsed_encryption_keys)  # type: ignore[call-arg]
    now = datetime.now(UTC)
    rows, tenant_ids, connection_ids = [], [], []
    for i in range(tenants):
        cid = uuid.uuid4()
        tenant = f"tenant-{i:06d}"
        # Shaped like the emulator's (and Intuit's) tokens, so ciphertexts have a real length.
        access = ".".join(
            [
                "eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0",
                "",
                secrets.token_urlsafe(16),
                secrets.token_urlsafe(96),
                secrets.token_urlsafe(16),
            ]
        )
        refresh = "AB11" + secrets.token_urlsafe(36)
        created = now - timedelta(days=30, minutes=i)
        rows.append(
            (
                cid,
                tenant,
                "connected",
                f"93{i:014d}",
                f"Company {i}",
                f"user-{i:06d}",
                str(uuid.uuid4()),
                f"owner{i}@example.com",
                f"Owner {i}",
                i % 2 == 0,
                i % 3 == 0,
                box.encrypt(access, sealed_aad(cid, Sealed.ACCESS)),
                box.encrypt(refresh, sealed_aad(cid, Sealed.REFRESH)),
                now + timedelta(days=1),
                now + timedelta(days=100),
                now - timedelta(hours=1),
                now + timedelta(hours=23),
                now - timedelta(hours=1),
                created,
                None,
                created,
                now - timedelta(hours=1),
            )
        )
        tenant_ids.append(tenant)
        connection_ids.append(str(cid))
    return rows, tenant_ids, connection_ids


def write_targets(path: Path, lines: list[tuple[str, str, str]]) -> Path:
    path.write_text("".join(f"{target}\t{name}\t{value}\n" for target, name, value in lines))
    return path


def shape(value: Any) -> Any:
    """The keys of a JSON document, nested: what two implementations must agree on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def check_same_answers(
    broker: str, raw: str, status: tuple[str, str, str], token: tuple[str, str, str]
) -> None:
    """Both servers answer 200 with the same token, and (or a warning says) the same fields."""
    answers = {}
    for name, base in (("broker", broker), ("raw", raw)):
        for kind, (target, header, value) in (("status", status), ("token", token)):
            response = httpx.get(base + target, headers={header: value}, timeout=10)
            if response.status_code != 200:
                raise SystemExit(f"{name} {kind}: {response.status_code} {response.text}")
            answers[name, kind] = response.json()
    for kind in ("status", "token"):
        if shape(answers["broker", kind]) != shape(answers["raw", kind]):
            # Still measured, but raw_app.py should be brought up to the broker's answer.
            print(
                f"WARNING {kind}: broker and raw answer different fields:\n"
                f"  broker {json.dumps(shape(answers['broker', kind]))}\n"
                f"  raw    {json.dumps(shape(answers['raw', kind]))}",
                flush=True,
            )
    if answers["broker", "token"]["access_token"] != answers["raw", "token"]["access_token"]:
        raise SystemExit("token: broker and raw decrypt different access tokens")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs per server and endpoint, the two servers alternating (broker first in odd "
        "rounds, raw first in even ones); the ratios are compared round by round",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="load generator (auto: wrk if installed, else httpx)",
    )
    parser.add_argument(
        "--status-auth",
        choices=("jwt", "key"),
        default="jwt",
        help="/status as a user (JWT for the tenant) or a service (API key)",
    )
    args = parser.parse_args()
    client = pick_client(args.client)

    with fresh_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        rows, tenants, connection_ids = seed_rows(args.tenants)
        asyncio.run(copy_connections(database_url, rows))
        status_key = asyncio.run(new_api_key(database_url, "status:read", name="bench-status"))
        token_key = asyncio.run(new_api_key(database_url, "tokens:read", name="bench-tokens"))

        status_lines = []
        for tenant, row in zip(tenants, rows, strict=True):
            if args.status_auth == "jwt":
                header, value = "Authorization", user_headers(tenant, row[5])["Authorization"]
            else:
                header, value = "X-API-Key", status_key
            status_lines.append((f"/status?tenant_id={tenant}", header, value))
        token_lines = [(f"/connections/{cid}/token", "X-API-Key", token_key) for cid in connection_ids]
        targets = {
            "/status": write_targets(Path(tmp) / "status.tsv", status_lines),
            "token": write_targets(Path(tmp) / "token.tsv", token_lines),
        }

        broker_port, raw_port = free_port(), free_port()
        env = broker_env(
            database_url, public_url=f"http://127.0.0.1:{broker_port}", emulator_url=UNUSED_INTUIT
        )
        broker = Server(
            "broker", uvicorn_command("service.main:create_app", broker_port), broker_port, env=env
        )
        raw = Server(
            "raw", uvicorn_command("raw_app:create_app", raw_port, app_dir=BENCH_DIR), raw_port, env=env
        )
        rounds: dict[tuple[str, str], list[LoadResult]] = {}
        cpu_ms: dict[tuple[str, str], float] = {}
        with running(broker, raw):
            check_same_answers(broker.url, raw.url, status_lines[0], token_lines[0])
            for endpoint, path in targets.items():
                cpu = dict.fromkeys(("broker", "raw"), 0.0)
                for n in range(args.rounds):
                    # Alternating, so that a machine slowing down or speeding up during the run
                    # does not favour the server that always goes first.
                    for server in (broker, raw) if n % 2 == 0 else (raw, broker):
                        print(
                            f"load: {endpoint} on {server.name}, round {n + 1} of {args.rounds} "
                            f"({args.warmup:g} s warm-up, {args.duration:g} s measured)",
                            flush=True,
                        )
                        cpu_before = server.cpu_seconds()
                        result = run_load(
                            client,
                            server.url,
                            path,
                            concurrency=args.concurrency,
                            warmup=args.warmup,
                            duration=args.duration,
                        )
                        rounds.setdefault((endpoint, server.name), []).append(result)
                        cpu[server.name] += server.cpu_seconds() - cpu_before
                for name, seconds in cpu.items():
                    served = sum(r.all_requests for r in rounds[endpoint, name])
                    cpu_ms[endpoint, name] = seconds * 1000 / max(served, 1)
            memory = {server.name: server.memory_mb() for server in (broker, raw)}

    print(
        f"\n{args.tenants} tenants, {args.concurrency} concurrent clients ({client}), "
        f"{args.duration:g} s per run after {args.warmup:g} s warm-up; one uvicorn worker each; "
        f"/status as {'a user (JWT)' if args.status_auth == 'jwt' else 'a service (API key)'}; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    # CPU ms per request is the server process's own CPU time over the requests it served: less
    # disturbed than req/s when other work shares the machine.
    print_table(
        f"Throughput and latency (all {args.rounds} rounds: req/s over their measured time, the "
        "median round's p50 and p99, the largest max)",
        [
            "endpoint",
            "server",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU ms/req",
            "non-2xx",
            "socket errors",
        ],
        [
            [
                e,
                s,
                sum(r.requests for r in rs),
                f"{sum(r.requests for r in rs) / max(sum(r.seconds for r in rs), 1e-9):.0f}",
                f"{statistics.median(r.p50_ms for r in rs):.2f}",
                f"{statistics.median(r.p99_ms for r in rs):.2f}",
                f"{max(r.max_ms for r in rs):.1f}",
                f"{cpu_ms[e, s]:.2f}",
                sum(r.non_2xx for r in rs),
                sum(r.socket_errors for r in rs),
            ]
            for (e, s), rs in rounds.items()
        ],
    )
    ratio_rows = []
    for endpoint, target in (("/status", STATUS_TARGET), ("token", TOKEN_TARGET)):
        ratios = [
            b.rps / max(r.rps, 1e-9)
            for b, r in zip(rounds[endpoint, "broker"], rounds[endpoint, "raw"], strict=True)
        ]
        ratio = statistics.median(ratios)
        cpu_ratio = cpu_ms[endpoint, "raw"] / max(cpu_ms[endpoint, "broker"], 1e-9)
        ratio_rows.append(
            [
                endpoint,
                " ".join(f"{x:.2f}x" for x in ratios),
                f"{ratio:.2f}x",
                f"{cpu_ratio:.2f}x",
                f">= {target:.1f}x",
                verdict(ratio >= target),
            ]
        )
    print_table(
        "Broker relative to raw (the target is on throughput, the median round's)",
        ["endpoint", "req/s broker / raw, by round", "median", "raw CPU / broker CPU per req", "target", ""],
        ratio_rows,
    )
    print_table(
        "Resident memory after the run (one worker)",
        ["process", "VmRSS MB", "VmHWM MB", "target", ""],
        [
            [
                "broker",
                f"{memory['broker'][0]:.1f}",
                f"{memory['broker'][1]:.1f}",
                f"<= {MEMORY_TARGET_MB:.0f} MB",
                verdict(memory["broker"][0] <= MEMORY_TARGET_MB),
            ],
            ["raw", f"{memory['raw'][0]:.1f}", f"{memory['raw'][1]:.1f}", "", ""],
        ],
    )


if __name__ == "__main__":
    main()
