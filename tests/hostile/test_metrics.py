"""/metrics: the database figures are read at most every 30 s (once for concurrent scrapes), and
BROKER_METRICS_PORT moves /metrics off the main port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from service.main import create_app
from service.ops import DATABASE_FIGURES_MAX_AGE, DatabaseFigures
from tests.conftest import Stack, broker_settings, user_headers
from tests.support.db_helpers import execute
from tests.support.processes import REPO_ROOT, BrokerProcess, process_env, settings_env
from tests.support.servers import ThreadedServer, free_port


def _reads() -> float:
    return REGISTRY.get_sample_value("qbo_broker_metrics_database_reads_total") or 0.0


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return None


PENDING = 'qbo_broker_connections{status="pending"}'


def _server(stack: Stack, **overrides: Any) -> ThreadedServer:
    port = free_port()
    return ThreadedServer(
        create_app(broker_settings(stack.database_url, port, stack.emulator_url, **overrides)), port
    ).start()


@pytest.fixture
def fresh(stack: Stack) -> Iterator[str]:
    """A broker of its own, whose database figures nobody has read yet."""
    server = _server(stack)
    yield server.url
    server.stop()


async def test_scrapes_within_the_window_read_the_database_once(
    fresh: str, stack: Stack, client: httpx.AsyncClient
) -> None:
    assert DATABASE_FIGURES_MAX_AGE == 30
    await client.post("/connections", json={}, headers=user_headers())
    before = _reads()
    async with httpx.AsyncClient(base_url=fresh, timeout=10) as http:
        scrapes = await asyncio.gather(*(http.get("/metrics") for _ in range(8)))
        assert {r.status_code for r in scrapes} == {200}
        assert _reads() == before + 1  # eight concurrent scrapes, one read
        assert {_sample(r.text, PENDING) for r in scrapes} == {1.0}
        await client.post("/connections", json={}, headers=user_headers())
        again = await http.get("/metrics")
        assert _reads() == before + 1
        assert _sample(again.text, PENDING) == 1.0  # the figure read moments ago


async def test_figures_are_read_again_once_stale(runtime, stack: Stack) -> None:
    from starlette.datastructures import State

    figures, state = DatabaseFigures(max_age=0.3), State()
    state.runtime = runtime
    before = _reads()
    await figures.refresh(runtime)
    await asyncio.gather(*(figures.refresh(runtime) for _ in range(5)))
    assert _reads() == before + 1
    await execute(
        stack.database_url,
        "INSERT INTO connections (id, tenant_id, status) VALUES (gen_random_uuid(), 'tenant-m', 'pending')",
    )
    await asyncio.sleep(0.35)
    await asyncio.gather(*(figures.refresh(runtime) for _ in range(5)))
    assert _reads() == before + 2
    assert REGISTRY.get_sample_value("qbo_broker_connections", {"status": "pending"}) == 1.0


async def test_a_metrics_port_takes_metrics_off_the_main_port(stack: Stack) -> None:
    metrics_port = free_port()
    server = _server(stack, BROKER_METRICS_PORT=metrics_port)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            main = await http.get(f"{server.url}/metrics")
            assert main.status_code == 404
            assert main.headers["content-type"] == "application/problem+json"
            assert main.json()["code"] == "not_found"
            assert (await http.get(f"{server.url}/healthz")).status_code == 200
            internal = f"http://127.0.0.1:{metrics_port}"
            scraped = await http.get(f"{internal}/metrics")
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
            assert "qbo_broker_http_requests_total" in scraped.text
            assert _sample(scraped.text, PENDING) is not None
            other = await http.get(f"{internal}/status")
            assert (other.status_code, other.json()["code"]) == (404, "not_found")
            posted = await http.post(f"{internal}/metrics")
            assert (posted.status_code, posted.json()["code"]) == (405, "method_not_allowed")
    finally:
        server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", metrics_port), timeout=2):
        pass  # closed with the app


class _Served(BrokerProcess):
    """`qbo-broker serve`, as the image runs it."""

    def spawn(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._process = subprocess.Popen(  # noqa: S603 (a fixed command line)
                [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=process_env(self.env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )


async def test_serve_exposes_metrics_on_the_metrics_port(stack: Stack, tmp_path: Path) -> None:
    metrics_port = free_port()
    env = settings_env(stack.settings, BROKER_METRICS_PORT=metrics_port)
    served = _Served("metrics", env, tmp_path)
    served.spawn()
    try:
        await asyncio.to_thread(served.wait_healthy)
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{served.url}/metrics")).status_code == 404
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert scraped.status_code == 200 and "qbo_broker_" in scraped.text
            # serve bounds request heads (service.core.httpserver).
            huge = await http.get(f"{served.url}/healthz", headers={"X-Padding": "a" * 1_000_000})
            assert huge.status_code == 431
    finally:
        served.stop()
    assert not served.running


def test_serve_refuses_a_metrics_port_with_several_workers(tmp_path: Path) -> None:
    from tests.test_cli import run

    env = {
        "INTUIT_CLIENT_ID": "a",
        "INTUIT_CLIENT_SECRET": "b",
        "BROKER_DATA_DIR": str(tmp_path),
        "BROKER_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "=",
        "BROKER_JWT_SECRET": "s" * 40,
        "BROKER_METRICS_PORT": "9464",
    }
    out = run("serve", "--workers", "2", env=env)
    assert out.returncode == 2 and "BROKER_METRICS_PORT needs --workers 1" in out.stderr
    same = run("serve", "--port", "9464", env=env)
    assert same.returncode == 2 and "must differ from --port" in same.stderr
