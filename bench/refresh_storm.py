"""A refresh storm: 1,000 concurrent GET /connections/{id}/token over 100 connections whose
access tokens have expired, spread over two broker processes, with Intuit (the emulator, in a
process of its own) answering after 100 ms. Each connection must be refreshed exactly once
(single-flight in a process, an advisory lock across the two), every caller must get that one new
token, and nobody may spend a dead refresh token (invalid_grant).

The 100 connections are made through the real Connect flow over HTTP (the broker's authorize,
the emulator's sign-in and consent forms, the broker's /callback), one QuickBooks company and
admin each, with the emulator at no latency; then their access tokens are expired by SQL.

Each request carries an X-Request-ID, and the brokers log when each refresh passed each point
(service.tokens.refresh's timeline logger, turned on here by a logging configuration of uvicorn's),
so the benchmark can tell where the slowest requests spent their time. The lower bound printed
beside p99 is what the latency cannot go under: Intuit's latency times the rounds of refreshes
one process may run (ceil(connections / BROKER_REFRESH_CONCURRENCY)), plus a database round trip.

    uv run python bench/refresh_storm.py [--connections 100] [--requests 1000] [--latency-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import (
    Server,
    broker_env,
    connect_many,
    create_companies,
    db_connect,
    emulator_command,
    emulator_stats,
    free_port,
    fresh_database,
    new_api_key,
    percentile,
    print_table,
    running,
    set_emulator_config,
    uvicorn_command,
    verdict,
)

from service.core.config import Settings

P99_TARGET_S = 0.5
RATIO_TARGET = 2.5
TIMELINE_LOGGER = "qbo_broker.refresh_timeline"

# What the time up to each of a refresh's marks was spent on (service/tokens/refresh.py).
PHASES = {
    "probed": "lock: probe while every slot was busy",
    "probed_busy": "lock: probe while every slot was busy",
    "slot": "waiting for a refresh slot",
    "lock_sent": "lock: waiting for its round to go out",
    "lock_taken": "lock: round at the server",
    "lock_busy": "lock: round at the server",
    "pool": "waiting for a pool connection",  # earlier versions; now part of the next
    "attempt": "decision under the row lock + attempt record",
    "intuit": "Intuit",
    "stored": "storing the outcome",
    "notified": "other process's refresh (woken by notification)",
    "polled": "other process's refresh (woken by the poll)",
    "notified_in_queue": "waiting for a slot, until another process's refresh (notified)",
    "read": "re-reading the row",
}
BEFORE = "HTTP in, auth (before the refresher)"
VIEW = "reading the connection (cache miss)"
HANDOVER = "refresh done, back to the request"
AFTER = "answer out (HTTP)"
NO_REFRESH = "answered without a refresh (whole request)"


@dataclass
class Answer:
    request_id: str
    connection_id: str
    status: int
    code: str | None
    access_token: str | None
    sent_at: float  # time.monotonic(), the clock the brokers' timelines use
    done_at: float

    @property
    def seconds(self) -> float:
        return self.done_at - self.sent_at


def refresh_counts(stats: dict[str, Any]) -> Counter[str]:
    return Counter(stats.get("token", {}).get("refresh_token", {}))


class KeepAliveConnection:
    """One bare HTTP/1.1 keep-alive connection. With 1,000 of them httpx's pool itself costs
    several CPU seconds, which on a small machine is taken from the brokers under test; this
    costs next to nothing. It understands just what the broker answers (Content-Length bodies).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader, self._writer, self._host = reader, writer, host

    @classmethod
    async def open(cls, base_url: str) -> KeepAliveConnection:
        url = httpx.URL(base_url)
        assert url.host and url.port
        reader, writer = await asyncio.open_connection(url.host, url.port)
        return cls(reader, writer, f"{url.host}:{url.port}")

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = [f"GET {path} HTTP/1.1", f"Host: {self._host}", *(f"{k}: {v}" for k, v in headers.items())]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        length = next(
            (
                int(v)
                for k, _, v in (h.partition(":") for h in header_lines)
                if k.strip().lower() == "content-length"
            ),
            None,
        )
        if length is None:
            raise RuntimeError(f"an answer without Content-Length: {status_line}")
        return int(status_line.split(" ", 2)[1]), await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def fire(
    connections: list[KeepAliveConnection], ids: list[str], key: str
) -> tuple[list[Answer], float]:
    """One request per connection, all released at once, each timed from its own send.
    Returns the answers and the moment of release."""
    release = asyncio.Event()
    answers: list[Answer] = []

    async def one(index: int, connection: KeepAliveConnection) -> None:
        connection_id = ids[index % len(ids)]
        request_id = f"storm-{index}"
        await release.wait()
        started = time.monotonic()
        try:
            status, raw = await connection.get(
                f"/connections/{connection_id}/token", {"X-API-Key": key, "X-Request-ID": request_id}
            )
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
            answers.append(
                Answer(request_id, connection_id, 0, type(exc).__name__, None, started, time.monotonic())
            )
            return
        ended = time.monotonic()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        answers.append(
            Answer(
                request_id, connection_id, status, body.get("code"), body.get("access_token"), started, ended
            )
        )

    tasks = [asyncio.create_task(one(i, c)) for i, c in enumerate(connections)]
    await asyncio.sleep(0.2)  # every task parked on the release
    released_at = time.monotonic()
    release.set()
    await asyncio.gather(*tasks)
    return answers, released_at


def timeline_logging(directory: Path, name: str) -> tuple[Path, Path]:
    """A uvicorn logging configuration (JSON) that turns the broker's refresh timeline on and
    writes it, one JSON object a line, to a file of its own. Returns (configuration, file)."""
    lines = directory / f"{name}-timeline.jsonl"
    config = directory / f"{name}-logging.json"
    config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"timeline": {"format": "%(timeline)s"}},
                "handlers": {
                    "timeline": {
                        "class": "logging.FileHandler",
                        "filename": str(lines),
                        "formatter": "timeline",
                    }
                },
                "loggers": {
                    TIMELINE_LOGGER: {"level": "DEBUG", "handlers": ["timeline"], "propagate": False}
                },
            }
        )
    )
    return config, lines


def read_timelines(files: list[Path]) -> dict[str, dict[str, Any]]:
    """The brokers' timeline lines, by request id."""
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("request_id"):
                    entry["broker"] = path.name.removesuffix("-timeline.jsonl")
                    found[entry["request_id"]] = entry
    return found


def story_rows(
    answers: list[Answer], timelines: dict[str, dict[str, Any]], released_at: float, count: int
) -> list[list[str]]:
    """The slowest requests one by one: each refresh it waited on, as its marks in ms since the
    release, and the refresh that called Intuit for its connection (in either broker)."""
    calls = {
        t["connection_id"]: t for t in timelines.values() if any(phase == "intuit" for phase, _ in t["marks"])
    }

    def marks(timeline: dict[str, Any]) -> str:
        return " ".join(f"{phase}@{(moment - released_at) * 1000:.0f}" for phase, moment in timeline["marks"])

    rows = []
    for answer in sorted(answers, key=lambda a: a.seconds, reverse=True)[:count]:
        timeline = timelines.get(answer.request_id)
        if timeline is None:
            rows.append([answer.request_id, "", f"{answer.seconds * 1000:.0f}", "no refresh"])
            continue
        rows.append(
            [
                answer.request_id,
                timeline["broker"],
                f"{answer.seconds * 1000:.0f}",
                f"entered@{(timeline['entered'] - released_at) * 1000:.0f} {marks(timeline)}",
            ]
        )
        call = calls.get(timeline["connection_id"])
        if call is not None and call["refresh"] != timeline["refresh"]:
            rows.append(["  its refresh", call["broker"], "", marks(call)])
    return rows


def phases_of(answer: Answer, timeline: dict[str, Any] | None) -> dict[str, float]:
    """Where one request's time went: from its send to its answer, cut at the refresh's marks
    (those before the request joined the refresh are not its time)."""
    spent: defaultdict[str, float] = defaultdict(float)
    if timeline is None:
        spent[NO_REFRESH] = answer.seconds
        return spent
    entered, left = timeline["entered"], timeline["left"]
    began = (
        timeline["view"] if timeline["view"] is not None and timeline["view"] >= answer.sent_at else entered
    )
    spent[BEFORE] += max(0.0, began - answer.sent_at)
    spent[VIEW] += max(0.0, entered - began)
    at = entered
    for phase, moment in timeline["marks"][1:]:
        if moment <= at:
            continue
        upto = min(moment, left)
        spent[PHASES.get(phase, phase)] += upto - at
        at = upto
        if at >= left:
            break
    spent[HANDOVER] += max(0.0, left - at)
    spent[AFTER] += max(0.0, answer.done_at - left)
    return spent


def breakdown_rows(
    answers: list[Answer], timelines: dict[str, dict[str, Any]], p99: float
) -> list[list[str]]:
    slowest = [a for a in answers if a.seconds >= p99]
    columns = [slowest, answers]
    sums: list[defaultdict[str, float]] = [defaultdict(float), defaultdict(float)]
    for column, total in zip(columns, sums, strict=True):
        for answer in column:
            for phase, seconds in phases_of(answer, timelines.get(answer.request_id)).items():
                total[phase] += seconds
    order = [BEFORE, VIEW, *dict.fromkeys(PHASES.values()), HANDOVER, AFTER, NO_REFRESH]
    rows = []
    for phase in order:
        if not any(total.get(phase) for total in sums):
            continue
        cells = [phase]
        for column, total in zip(columns, sums, strict=True):
            mean = total.get(phase, 0.0) / max(1, len(column))
            cells.append(f"{mean * 1000:.0f}")
        rows.append(cells)
    rows.append(
        ["total (mean latency)", *(f"{statistics.fmean(a.seconds for a in c) * 1000:.0f}" for c in columns)]
    )
    return rows


async def postgres_pids(database_url: str) -> list[int]:
    """The server's processes serving this database, and its background ones."""
    db = await db_connect(database_url)
    try:
        return [
            r["pid"]
            for r in await db.fetch(
                "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() "
                "OR datname IS NULL) AND pid <> pg_backend_pid()"
            )
        ]
    finally:
        await db.close()


def processes_cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of these processes so far (None: none of them on this host)."""
    total, found = 0.0, False
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, PermissionError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        found = True
    return total if found else None


async def database_round_trip(database_url: str) -> float:
    """The median of 50 `SELECT 1` on one connection, in seconds."""
    db = await db_connect(database_url)
    try:
        times = []
        for _ in range(50):
            started = time.monotonic()
            await db.fetchval("SELECT 1")
            times.append(time.monotonic() - started)
        return statistics.median(times)
    finally:
        await db.close()


async def storm(
    args: argparse.Namespace,
    database_url: str,
    emulator: Server,
    brokers: list[Server],
    timeline_files: list[Path],
) -> None:
    # One more connection than the storm's, refreshed by each broker before the storm: a broker
    # in service has refreshed before (its refresh lock session open, its statements prepared).
    everyone = await create_companies(emulator.url, args.connections + 1)
    all_ids, connect_seconds = await connect_many(brokers[0].url, everyone, concurrency=8)
    print(
        f"connected {len(all_ids)} connections through the Connect flow in {connect_seconds:.1f} s",
        flush=True,
    )
    admins, ids, warm_id = everyone[:-1], all_ids[:-1], all_ids[-1]
    key = await new_api_key(database_url, "tokens:read")

    # Connections opened first, as a calling service's pool would have them: the storm
    # measures the broker, not TCP handshakes. uvicorn keeps idle ones for 5 s.
    # Request i asks for connection i mod N from broker (i div N) mod B: every connection is
    # asked for from every broker, so the brokers contend for the same rows.
    connections = await asyncio.gather(
        *(KeepAliveConnection.open(brokers[(i // len(ids)) % len(brokers)].url) for i in range(args.requests))
    )
    try:
        # Each one used once, for the token it will ask for again, while that is still fresh:
        # the brokers are in service, as before any storm (the caller's key known, database
        # pools open). All at once, as a busy service would have asked: one at a time, each
        # broker's pool would open one connection, and the storm would pay for opening the
        # others. Nothing is refreshed here; the emulator's counts are taken after.
        async def warm(index: int, connection: KeepAliveConnection) -> None:
            status, _ = await connection.get(
                f"/connections/{ids[index % len(ids)]}/token", {"X-API-Key": key}
            )
            assert status == 200

        if not args.sequential_warmup:
            async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": key}) as http:
                for broker in brokers:
                    forced = await http.get(
                        f"{broker.url}/connections/{warm_id}/token", params={"force_refresh": "true"}
                    )
                    assert forced.status_code == 200, forced.text
        if args.sequential_warmup:
            for index, connection in enumerate(connections):
                await warm(index, connection)
        else:
            # Twice: the first use of a key records it (last_used_at), and the notification of
            # that write drops the key from every broker's cache, the one load that all the
            # concurrent first requests shared included. The second time it is cached for good.
            for _ in range(2):
                await asyncio.gather(*(warm(i, c) for i, c in enumerate(connections)))
        db = await db_connect(database_url)
        try:
            before_tokens = {
                str(r["id"]): r["access_token"]
                for r in await db.fetch(
                    "SELECT id, access_token FROM connections WHERE id = ANY($1::uuid[])", ids
                )
            }
            await db.execute(
                "UPDATE connections SET access_token_expires_at = now() - interval "
                "'1 minute' WHERE id = ANY($1::uuid[])",
                ids,
            )
        finally:
            await db.close()
        await set_emulator_config(emulator.url, latency_ms=args.latency_ms)
        stats_before = await emulator_stats(emulator.url)
        await asyncio.sleep(0.5)  # the brokers' caches hear of the expiry (NOTIFY)
        round_trip = await database_round_trip(database_url)
        postgres = await postgres_pids(database_url)
        load = os.getloadavg()
        servers = [*brokers, emulator]
        cpu_before = [s.cpu_seconds() for s in servers]
        postgres_before = processes_cpu_seconds(postgres)
        client_cpu_before = time.process_time()
        answers, released_at = await fire(connections, ids, key)
        client_cpu = time.process_time() - client_cpu_before
        cpu = {s.name: s.cpu_seconds() - c for s, c in zip(servers, cpu_before, strict=True)}
        if postgres_before is not None:
            after = processes_cpu_seconds(postgres)
            if after is not None:
                cpu["postgres (its processes on this host)"] = after - postgres_before
    finally:
        await asyncio.gather(*(c.close() for c in connections))

    stats_after = await emulator_stats(emulator.url)
    refreshes = refresh_counts(stats_after) - refresh_counts(stats_before)
    by_realm = stats_after.get("refresh_by_realm", {})
    overlapping = max((n for n in stats_after.get("max_concurrent_refresh", {}).values()), default=0)
    db = await db_connect(database_url)
    try:
        stored = await db.fetch(
            "SELECT id, access_token, status FROM connections WHERE id = ANY($1::uuid[])", ids
        )
        events = await db.fetchval(
            "SELECT count(*) FROM connection_events WHERE type = 'refreshed' "
            "AND connection_id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await db.close()

    ok = [a for a in answers if a.status == 200]
    tokens: defaultdict[str, set[str]] = defaultdict(set)
    for a in ok:
        assert a.access_token is not None
        tokens[a.connection_id].add(a.access_token)
    distinct = Counter(len(tokens.get(cid, set())) for cid in ids)
    errors = Counter(f"{a.status} {a.code}" for a in answers if a.status != 200)
    latencies = [a.seconds for a in answers]
    p99 = percentile(latencies, 99)
    concurrency = args.refresh_concurrency or Settings.model_fields["refresh_concurrency"].default
    floor = args.latency_ms / 1000 * math.ceil(len(ids) / concurrency) + round_trip
    rotated = sum(1 for r in stored if r["access_token"] != before_tokens[str(r["id"])])
    realms_refreshed_once = sum(1 for a in admins if by_realm.get(a.realm_id, {}).get("ok") == 1)

    print(
        f"\n{args.requests} concurrent token requests over {len(ids)} expired connections, "
        f"{len(brokers)} broker processes (default pool settings), emulator latency "
        f"{args.latency_ms} ms; load average before the storm "
        f"{' '.join(f'{x:.2f}' for x in load)}, after "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print_table(
        "Refresh storm",
        ["figure", "value", "target", ""],
        [
            [
                "refreshes counted by the emulator",
                refreshes["ok"],
                len(ids),
                verdict(refreshes["ok"] == len(ids)),
            ],
            [
                "invalid_grant at the emulator",
                refreshes["invalid_grant"],
                0,
                verdict(refreshes["invalid_grant"] == 0),
            ],
            [
                "other refresh outcomes at the emulator",
                sum(n for k, n in refreshes.items() if k not in ("ok", "invalid_grant")),
                0,
                "",
            ],
            [
                "companies refreshed exactly once",
                realms_refreshed_once,
                len(ids),
                verdict(realms_refreshed_once == len(ids)),
            ],
            ["most refreshes of one company at once", overlapping, 1, verdict(overlapping <= 1)],
            ["connections with 1 distinct token", distinct[1], len(ids), verdict(distinct[1] == len(ids))],
            ["connections with > 1 distinct token", sum(n for k, n in distinct.items() if k > 1), 0, ""],
            [
                "'refreshed' events / rows with a new token",
                f"{events} / {rotated}",
                len(ids),
                verdict(events == rotated == len(ids)),
            ],
            ["answers 200", len(ok), args.requests, verdict(len(ok) == args.requests)],
            ["errors", sum(errors.values()), 0, verdict(not errors)],
            ["latency p50 (s)", f"{percentile(latencies, 50):.3f}", "", ""],
            ["latency p99 (s)", f"{p99:.3f}", f"<= {P99_TARGET_S}", verdict(p99 <= P99_TARGET_S)],
            ["latency max (s)", f"{max(latencies):.3f}", "", ""],
            [
                f"lower bound (s): {args.latency_ms} ms x ceil({len(ids)}/{concurrency}) + DB round "
                f"trip {round_trip * 1000:.2f} ms",
                f"{floor:.3f}",
                "",
                "",
            ],
            [
                "p99 / lower bound",
                f"{p99 / floor:.2f}",
                f"<= {RATIO_TARGET}",
                verdict(p99 / floor <= RATIO_TARGET),
            ],
            ["all answered after (s)", f"{max(a.done_at for a in answers) - released_at:.3f}", "", ""],
        ],
    )
    # Where the CPU went during the storm: on a shared machine, a storm that took far longer than
    # its CPU time waited for the CPU (or on locks), not on its own work.
    # On a machine with few cores the CPU they all need is a floor of its own: the storm cannot
    # be over sooner than that CPU time spread over every core.
    total_cpu = sum(cpu.values()) + client_cpu
    # The cores it may run on (taskset), where the system tells.
    affinity = getattr(os, "sched_getaffinity", None)
    cores = (len(affinity(0)) if affinity else os.cpu_count()) or 1
    print_table(
        "CPU seconds used during the storm",
        ["process", "CPU s"],
        [
            *([name, f"{seconds:.2f}"] for name, seconds in cpu.items()),
            [f"this process (the {args.requests} clients)", f"{client_cpu:.2f}"],
            [
                f"all of them; spread over {cores} core{'s' if cores > 1 else ''}: at least (s)",
                f"{total_cpu:.2f}; {total_cpu / cores:.2f}",
            ],
        ],
    )
    if errors:
        print_table("Errors", ["status code", "count"], sorted(errors.items()))
    timelines = read_timelines(timeline_files)
    if timelines:
        slowest = sum(1 for a in answers if a.seconds >= p99)
        waited = sum(1 for a in answers if a.request_id in timelines)
        print_table(
            f"Where the time went, mean ms per request ({waited} of "
            f"{len(answers)} requests waited on a refresh)",
            ["phase", f"slowest {slowest} (>= p99)", f"all {len(answers)}"],
            breakdown_rows(answers, timelines, p99),
        )
        if args.show_slowest:
            print_table(
                "The slowest requests (marks: phase that ended @ ms since the release)",
                ["request", "broker", "ms", "marks"],
                story_rows(answers, timelines, released_at, args.show_slowest),
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--brokers", type=int, default=2)
    parser.add_argument(
        "--db-pool-size",
        type=int,
        default=None,
        help="BROKER_DB_POOL_SIZE for the brokers (default: the broker's default)",
    )
    parser.add_argument(
        "--refresh-concurrency",
        type=int,
        default=None,
        help="BROKER_REFRESH_CONCURRENCY for the brokers (default: the broker's)",
    )
    parser.add_argument(
        "--sequential-warmup",
        action="store_true",
        help="warm the brokers up as the benchmark did at first: one request "
        "at a time (their pools then hold one connection each when the "
        "storm starts) and no refresh before the storm",
    )
    parser.add_argument(
        "--show-slowest",
        type=int,
        default=0,
        metavar="N",
        help="print the timelines of the N slowest requests",
    )
    parser.add_argument(
        "--no-timeline",
        action="store_true",
        help="leave the brokers' refresh timeline off (no phase breakdown)",
    )
    args = parser.parse_args()

    with fresh_database() as database_url:
        emulator_port = free_port()
        broker_ports = [free_port() for _ in range(args.brokers)]
        # Both brokers are one deployment: one public URL, one registered redirect URI.
        public_url = f"http://127.0.0.1:{broker_ports[0]}"
        emulator = Server(
            "emulator",
            emulator_command(emulator_port, redirect_uri=f"{public_url}/callback"),
            emulator_port,
            ready_path="/.well-known/openid_configuration",
        )
        overrides = {} if args.db_pool_size is None else {"BROKER_DB_POOL_SIZE": str(args.db_pool_size)}
        if args.refresh_concurrency is not None:
            overrides["BROKER_REFRESH_CONCURRENCY"] = str(args.refresh_concurrency)
        env = broker_env(database_url, public_url=public_url, emulator_url=emulator.url, **overrides)
        with tempfile.TemporaryDirectory(prefix="qbo-bench-storm-") as scratch:
            brokers, timeline_files = [], []
            for n, port in enumerate(broker_ports):
                name = f"broker-{n + 1}"
                log_config = None
                if not args.no_timeline:
                    log_config, lines = timeline_logging(Path(scratch), name)
                    timeline_files.append(lines)
                brokers.append(
                    Server(
                        name,
                        uvicorn_command("service.main:create_app", port, log_config=log_config),
                        port,
                        env=env,
                    )
                )
            with running(emulator, *brokers):
                asyncio.run(storm(args, database_url, emulator, brokers, timeline_files))


if __name__ == "__main__":
    main()
