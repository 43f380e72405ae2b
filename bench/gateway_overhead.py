"""What the QuickBooks gateway adds to a call: the broker against the emulator called directly and
against bench/raw_proxy.py (a bare Starlette + httpx reverse proxy), in the same run.

One emulator (zero latency, throttles off), one broker and one raw proxy, each one uvicorn
worker in a process of its own, on one PostgreSQL. A company is linked through the real Connect
flow; the same read (`customer/1`) is then sent straight to the emulator, through the raw proxy
and through the broker: first by one client at a time (the added p50), then by N concurrent
clients (throughput). The broker's in-flight limit is on, far above the load; the per-second
and per-minute limits (and the pacing that follows from the latter) are off, or they would set
the pace. With the in-flight limit alone, a finished call's slot goes to the replica's next call
without a statement (`BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS`); a second broker, `broker_stmt`,
runs with that off, so each of its calls pays the admission statement it pays whenever the
windows are on (which also gives back the slot of the call before).

    uv run python bench/gateway_overhead.py [--concurrency 32] [--duration 10] [--warmup 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from statistics import median

import httpx
from harness import (
    BENCH_DIR,
    Server,
    broker_env,
    connect_through_flow,
    create_companies,
    emulator_command,
    free_port,
    fresh_database,
    new_api_key,
    print_table,
    running,
    set_emulator_config,
    uvicorn_command,
    verdict,
)
from loadgen import LoadResult, pick_client, run_load

ADDED_P50_TARGET_MS = 1.0
THROUGHPUT_TARGET = 0.8  # broker req/s as a share of raw_proxy's
HIGH = "1000"  # an in-flight limit no load here reaches


def write_targets(path: Path, target: str, *headers: str) -> Path:
    path.write_text("\t".join([target, *headers]) + "\n")
    return path


def combined(runs: list[LoadResult]) -> LoadResult:
    """Rounds of one load as one line: requests and time added up, each percentile the
    median of the rounds'."""
    return replace(
        runs[0],
        requests=sum(run.requests for run in runs),
        seconds=sum(run.seconds for run in runs),
        p50_ms=median(run.p50_ms for run in runs),
        p99_ms=median(run.p99_ms for run in runs),
        max_ms=max(run.max_ms for run in runs),
        non_2xx=sum(run.non_2xx for run in runs),
        socket_errors=sum(run.socket_errors for run in runs),
        all_requests=sum(run.all_requests for run in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="one-client turns per server (each --duration / rounds long, after --warmup / 2)",
    )
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    args = parser.parse_args()
    client = pick_client(args.client)

    with fresh_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        broker_port, stmt_port, raw_port, emulator_port = free_port(), free_port(), free_port(), free_port()
        public = f"http://127.0.0.1:{broker_port}"
        emulator = Server(
            "emulator",
            emulator_command(emulator_port, redirect_uri=f"{public}/callback"),
            emulator_port,
            ready_path="/.well-known/openid_configuration",
        )
        env = broker_env(
            database_url,
            public_url=public,
            emulator_url=emulator.url,
            BROKER_QUICKBOOKS_MAX_IN_FLIGHT=HIGH,
            BROKER_QUICKBOOKS_PER_SECOND="0",
            BROKER_QUICKBOOKS_PER_MINUTE="0",
        )
        broker = Server(
            "broker", uvicorn_command("service.main:create_app", broker_port), broker_port, env=env
        )
        broker_stmt = Server(
            "broker_stmt",
            uvicorn_command("service.main:create_app", stmt_port),
            stmt_port,
            env={**env, "BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS": "0"},
        )
        with running(emulator, broker, broker_stmt):
            asyncio.run(
                set_emulator_config(
                    emulator.url,
                    latency_ms=0,
                    throttle_concurrent=0,
                    throttle_per_second=0,
                    throttle_per_minute=0,
                    throttle_batch_per_minute=0,
                )
            )
            admin = asyncio.run(create_companies(emulator.url, 1))[0]

            async def link() -> tuple[str, str]:
                async with httpx.AsyncClient(base_url=broker.url, timeout=60) as http:
                    connection_id = await connect_through_flow(
                        http, tenant="tenant-bench", user="user-bench", admin=admin
                    )
                key = await new_api_key(database_url, "quickbooks:read", "tokens:read")
                return connection_id, key

            connection_id, key = asyncio.run(link())
            token = httpx.get(
                f"{broker.url}/connections/{connection_id}/token", headers={"X-API-Key": key}, timeout=10
            ).json()["access_token"]
            raw = Server(
                "raw_proxy",
                uvicorn_command("raw_proxy:create_app", raw_port, app_dir=BENCH_DIR),
                raw_port,
                env={
                    **os.environ,
                    "RAW_PROXY_UPSTREAM": emulator.url,
                    "RAW_PROXY_REALM": admin.realm_id,
                    "RAW_PROXY_ACCESS_TOKEN": token,
                },
                ready_path="/connections/x/quickbooks/companyinfo/" + admin.realm_id,
            )
            gateway_path = f"/connections/{connection_id}/quickbooks/customer/1"
            # name: (base URL, path, headers)
            calls = {
                "emulator": (
                    emulator.url,
                    f"/v3/company/{admin.realm_id}/customer/1?minorversion=75",
                    {"Authorization": f"Bearer {token}", "Accept": "application/json"},
                ),
                "raw_proxy": (raw.url, gateway_path, {"X-API-Key": "unused"}),
                "broker": (broker.url, gateway_path, {"X-API-Key": key}),
                "broker_stmt": (broker_stmt.url, gateway_path, {"X-API-Key": key}),
            }
            targets = {
                name: (
                    url,
                    write_targets(
                        Path(tmp) / f"{name}.tsv", path, *[item for pair in headers.items() for item in pair]
                    ),
                )
                for name, (url, path, headers) in calls.items()
            }
            results: dict[tuple[str, int], LoadResult] = {}
            added_by_round: dict[str, list[float]] = {}
            cpu_ms: dict[tuple[str, int], float] = {}
            servers = {"emulator": emulator, "raw_proxy": raw, "broker": broker, "broker_stmt": broker_stmt}
            with running(raw):
                for name, (url, path, headers) in calls.items():
                    check = httpx.get(url + path, headers=headers, timeout=10)
                    if check.status_code != 200 or "Customer" not in check.json():
                        raise SystemExit(f"{name}: {check.status_code} {check.text[:300]}")
                # One client: the servers take turns, round after round, so that the machine's
                # drift (large here from one minute to the next) falls on all of them alike.
                one: dict[str, list[LoadResult]] = {name: [] for name in targets}
                one_cpu = dict.fromkeys(targets, 0.0)
                for round_ in range(1, args.rounds + 1):
                    for name, (url, file) in targets.items():
                        print(f"load: {name}, 1 client, round {round_}", flush=True)
                        cpu_before = servers[name].cpu_seconds()
                        one[name].append(
                            run_load(
                                client,
                                url,
                                file,
                                concurrency=1,
                                warmup=args.warmup / 2,
                                duration=args.duration / args.rounds,
                            )
                        )
                        one_cpu[name] += servers[name].cpu_seconds() - cpu_before
                for name, runs in one.items():
                    results[name, 1] = combined(runs)
                    cpu_ms[name, 1] = one_cpu[name] * 1000 / max(results[name, 1].all_requests, 1)
                    added_by_round[name] = [
                        run.p50_ms - direct.p50_ms for run, direct in zip(runs, one["emulator"], strict=True)
                    ]
                for name, (url, file) in targets.items():
                    print(f"load: {name}, {args.concurrency} clients", flush=True)
                    cpu_before = servers[name].cpu_seconds()
                    results[name, args.concurrency] = run_load(
                        client,
                        url,
                        file,
                        concurrency=args.concurrency,
                        warmup=args.warmup,
                        duration=args.duration,
                    )
                    # The serving process's own CPU per request (for the broker and the raw
                    # proxy this leaves out the emulator's share of each call).
                    cpu_ms[name, args.concurrency] = (
                        (servers[name].cpu_seconds() - cpu_before)
                        * 1000
                        / max(results[name, args.concurrency].all_requests, 1)
                    )

    print(
        f"\none read (customer/1) per request; {client}; {args.duration:g} s measured per server "
        f"and load (one client: {args.rounds} rounds of {args.duration / args.rounds:g} s, each "
        f"after {args.warmup / 2:g} s warm-up, servers in turn; p50 and p99 the rounds' median); "
        f"{args.concurrency} clients after {args.warmup:g} s warm-up; one uvicorn worker each; "
        f"emulator at zero latency; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print_table(
        "Throughput and latency",
        [
            "server",
            "clients",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/req",
            "non-2xx",
            "socket errors",
        ],
        [
            [
                name,
                c,
                r.requests,
                f"{r.rps:.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{cpu_ms[name, c]:.2f}",
                r.non_2xx,
                r.socket_errors,
            ]
            for (name, c), r in results.items()
        ],
    )
    # Each round's p50 less the emulator's in the same round; the median of the rounds.
    added = {name: median(added_by_round[name]) for name in ("raw_proxy", "broker", "broker_stmt")}
    print(
        "\nadded p50 by round (ms): "
        + "; ".join(
            f"{name} {' '.join(f'{x:.2f}' for x in added_by_round[name])}"
            for name in ("raw_proxy", "broker", "broker_stmt")
        )
    )
    raw_rps = max(results["raw_proxy", args.concurrency].rps, 1e-9)
    ratio = {name: results[name, args.concurrency].rps / raw_rps for name in ("broker", "broker_stmt")}
    rows = []
    for name, how in (("broker", "slot reuse"), ("broker_stmt", "a statement a call")):
        rows.append(
            [
                f"added p50, 1 client (ms), {name} ({how})",
                f"{added[name]:.2f}",
                f"{added['raw_proxy']:.2f}",
                f"<= {ADDED_P50_TARGET_MS:.1f}",
                verdict(added[name] <= ADDED_P50_TARGET_MS),
            ]
        )
    for name in ("broker", "broker_stmt"):
        rows.append(
            [
                f"req/s, {args.concurrency} clients, {name} / raw_proxy",
                f"{ratio[name]:.2f}x",
                "1.00x",
                f">= {THROUGHPUT_TARGET:.1f}x",
                verdict(ratio[name] >= THROUGHPUT_TARGET),
            ]
        )
    print_table("The gateway's cost", ["figure", "broker", "raw_proxy", "target", ""], rows)


if __name__ == "__main__":
    main()
