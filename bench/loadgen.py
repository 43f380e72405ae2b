"""Closed-loop HTTP load from a process of its own: N concurrent clients, each sending GETs to
random targets for a fixed time after a warm-up, measuring throughput and latency.

Two generators give the same figures: `wrk` (Debian's package; light enough that it leaves the
CPU to the server) and, where wrk is missing, httpx with N asyncio tasks (this file run as a
script). Targets are lines of `path<TAB>header name<TAB>header value`, with more name and value pairs
as needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

LUA_SCRIPT = Path(__file__).resolve().parent / "random_targets.lua"


@dataclass(frozen=True)
class LoadResult:
    client: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    # Every request sent, warm-up included: divides the server's CPU time over the whole run.
    all_requests: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def pick_client(requested: str) -> str:
    if requested == "auto":
        return "wrk" if shutil.which("wrk") else "httpx"
    if requested == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk), or use --client httpx")
    return requested


def run_load(
    client: str, base_url: str, targets: Path, *, concurrency: int, warmup: float, duration: float
) -> LoadResult:
    """Warm up, then measure; blocks for warmup + duration seconds (plus start-up)."""
    if client == "wrk":
        warm = _wrk(base_url, targets, concurrency=concurrency, duration=warmup)
        measured = _wrk(base_url, targets, concurrency=concurrency, duration=duration)
        return replace(measured, all_requests=warm.requests + measured.requests)
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--base-url",
            base_url,
            "--targets",
            str(targets),
            "--concurrency",
            str(concurrency),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return LoadResult(**json.loads(output.strip().splitlines()[-1]))


def _wrk(base_url: str, targets: Path, *, concurrency: int, duration: float) -> LoadResult:
    # One thread: on a small machine a second one would only take CPU from the server.
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA_SCRIPT),
            base_url,
            "--",
            str(targets),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(x for x in output.splitlines() if x.startswith("WRK_JSON "))
    figures = json.loads(line.removeprefix("WRK_JSON "))
    return LoadResult(
        client="wrk",
        requests=figures["requests"],
        seconds=figures["duration_s"],
        p50_ms=figures["p50_ms"],
        p99_ms=figures["p99_ms"],
        max_ms=figures["max_ms"],
        non_2xx=figures["non_2xx"],
        socket_errors=figures["socket_errors"],
        all_requests=figures["requests"],
    )


def _read_targets(path: Path) -> list[tuple[str, dict[str, str]]]:
    targets = []
    for line in path.read_text().splitlines():
        target, *fields = line.split("\t")
        targets.append((target, dict(zip(fields[::2], fields[1::2], strict=True))))
    return targets


async def _httpx_load(
    base_url: str,
    targets: list[tuple[str, dict[str, str]]],
    *,
    concurrency: int,
    warmup: float,
    duration: float,
) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    sent = 0
    statuses: Counter[int] = Counter()
    socket_errors = 0
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10) as client:
        begin = time.perf_counter()
        measure_from, stop_at = begin + warmup, begin + warmup + duration

        async def worker() -> None:
            nonlocal socket_errors, sent
            while (started := time.perf_counter()) < stop_at:
                sent += 1
                path, headers = random.choice(targets)  # noqa: S311 - load, not secrets
                try:
                    response = await client.get(path, headers=headers)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                if started >= measure_from:
                    latencies.append(time.perf_counter() - started)
                    if status == 0:
                        socket_errors += 1
                    else:
                        statuses[status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - measure_from
    ordered = sorted(latencies)

    def ms(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0

    return LoadResult(
        client="httpx",
        requests=len(latencies),
        seconds=seconds,
        p50_ms=ms(0.50),
        p99_ms=ms(0.99),
        max_ms=ms(1.0),
        non_2xx=sum(n for s, n in statuses.items() if not 200 <= s < 300),
        socket_errors=socket_errors,
        all_requests=sent,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop  # a lighter event loop leaves more CPU to the server under test
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run  # type: ignore[assignment]
    result = runner(
        _httpx_load(
            args.base_url,
            _read_targets(args.targets),
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
        )
    )
    print(json.dumps(result.__dict__))


if __name__ == "__main__":
    main()
