"""PostgreSQL stopped under load: callers get 503 database_unavailable, never a 500 or a dropped
connection, and everything answers 200 again moments after the server is back.

The test runs a PostgreSQL of its own (the suite's shared server is never stopped), two broker
processes against it and an Intuit emulator, puts steady keep-alive load on GET /status (a user
JWT and an API key) and GET /connections/{id}/token (an API key), stops PostgreSQL for a few
seconds with `pg_ctl stop -m fast` (what an operator's restart or a failover does to the broker's
sessions), starts it again, and checks every answer.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.auth.api_keys import create_api_key
from service.core.db.engine import build_engine, build_sessionmaker
from service.core.db.migrations import upgrade_to_head
from service.emulator import EmulatorSettings
from service.emulator import create_app as create_emulator
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    COMPANY_1,
    RETURN_URL,
    broker_settings,
    finish_connect,
    user_headers,
)
from tests.support import database
from tests.support.intuit_user import sign_in_and_decide
from tests.support.processes import BrokerProcess, BrokerProcesses, settings_env
from tests.support.servers import ThreadedServer, free_port
from tests.support.waiting import until

OUTAGE_SECONDS = 4.0
RECOVERY_SECONDS = 5.0  # 200s again on every stream within this long after the restart
CLIENTS_PER_STREAM = 2


class StoppablePostgres:
    """An embedded PostgreSQL of this test's own, stopped and started with pgserver's pg_ctl."""

    def __init__(self, pgdata: Path) -> None:
        import pgserver

        self.pgdata = pgdata
        self._server = pgserver.get_server(pgdata, cleanup_mode=None)
        info = self._server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.admin_url = f"postgresql://postgres:@/postgres?host={self.socket_dir}"

    def _pg_ctl(self, *args: str) -> None:
        from pgserver import _commands

        pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009 (made at import, one per binary)
        pg_ctl(list(args), pgdata=self.pgdata, user=self._server.system_user, timeout=30)

    def stop(self) -> None:
        # "fast": every session is ended at once (FATAL 57P01), as a restart or failover does.
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start"
        )

    def close(self) -> None:
        try:
            self._pg_ctl("-w", "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # already stopped


@pytest.fixture(scope="module")
def outage_postgres() -> Iterator[StoppablePostgres]:
    # A short path of our own: the socket lives in it, and the server runs as another user when
    # the tests run as root.
    with tempfile.TemporaryDirectory(prefix="qbo-outage-") as tmp:
        server = StoppablePostgres(Path(tmp) / "pg")
        try:
            yield server
        finally:
            server.close()


@dataclass
class Answer:
    at: float
    status: int | None  # None: the request failed at the transport
    code: str | None = None
    retry_after: str | None = None
    request_id: str | None = None
    content_type: str | None = None
    error: str | None = None


@dataclass
class Stream:
    """One keep-alive client sending one kind of request back to back."""

    name: str
    url: str
    headers: dict[str, str]
    answers: list[Answer] = field(default_factory=list)
    connects: int = 0  # TCP connections the client opened; 1 if none was ever dropped

    async def _trace(self, event: str, _info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.connects += 1

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=20, limits=limits) as http:
            while not stop.is_set():
                try:
                    response = await http.get(
                        self.url, headers=self.headers, extensions={"trace": self._trace}
                    )
                except httpx.TransportError as exc:
                    self.answers.append(Answer(time.monotonic(), None, error=repr(exc)))
                    await asyncio.sleep(0.05)
                    continue
                code = None
                if response.status_code != 200:
                    try:
                        code = response.json().get("code")
                    except ValueError:
                        code = None
                self.answers.append(
                    Answer(
                        time.monotonic(),
                        response.status_code,
                        code,
                        response.headers.get("retry-after"),
                        response.headers.get("x-request-id"),
                        response.headers.get("content-type"),
                    )
                )
                await asyncio.sleep(0.01)


@dataclass
class Setup:
    brokers: list[BrokerProcess]
    connection_id: str
    api_key: str


@pytest.fixture(scope="module")
async def setup(
    outage_postgres: StoppablePostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Setup]:
    database_url = await database.create_database(outage_postgres.admin_url)
    await asyncio.to_thread(upgrade_to_head, database_url)
    emulator_port = free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    settings = broker_settings(database_url, 0, emulator_url)
    processes = BrokerProcesses(tmp_path_factory.mktemp("outage-brokers"))
    emulator: ThreadedServer | None = None
    try:
        brokers = [processes.spawn(name, settings_env(settings)) for name in ("a", "b")]
        emulator = ThreadedServer(
            create_emulator(
                EmulatorSettings(
                    public_url=emulator_url,
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    redirect_uris=[f"{b.url}/callback" for b in brokers],
                )
            ),
            emulator_port,
        ).start()
        await processes.ready(*brokers)
        engine = build_engine(database_url, pool_size=1)
        try:
            async with build_sessionmaker(engine)() as session, session.begin():
                _, api_key = await create_api_key(
                    session, name="outage", scopes=["status:read", "tokens:read"]
                )
        finally:
            await engine.dispose()
        async with httpx.AsyncClient(base_url=brokers[0].url, timeout=30) as http:
            created = await http.post("/connections", json={}, headers=user_headers())
            assert created.status_code == 201, created.text
            cid = created.json()["id"]
            started = await http.post(
                f"/connections/{cid}/authorize", json={"return_url": RETURN_URL}, headers=user_headers()
            )
            assert started.status_code == 200, started.text
            result = await finish_connect(
                http,
                await sign_in_and_decide(
                    started.json()["authorization_url"], email="alice@example.com", realm_id=COMPANY_1
                ),
                user_headers(),
            )
        assert result.params.get("result") == "connected", result.params
        yield Setup(brokers, cid, api_key)
    finally:
        processes.close()
        if emulator is not None:
            emulator.stop()


async def _ready(url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"{url}/readyz")).status_code


async def _caches_back(http: httpx.AsyncClient, broker: BrokerProcess, setup: Setup) -> bool:
    """Whether the broker's caches are on again: they are on only while its change feed listens."""
    text = (await http.get(f"{broker.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qbo_broker_caches_enabled":
                return sample.value == 1
    return False


def _summary(stream: Stream, stopped_at: float, restarted_at: float) -> list[str]:
    """What is wrong with one stream's answers (nothing, if all is well)."""
    problems = []
    wrong = [
        a
        for a in stream.answers
        if a.status not in (200, None)
        and (
            a.status != 503
            or a.code not in ("database_unavailable", "intuit_unavailable")
            or not a.retry_after
            or not a.request_id
            or a.content_type != "application/problem+json"
        )
    ]
    if wrong:
        problems.append(f"{stream.name}: {len(wrong)} wrong answers, e.g. {wrong[:3]}")
    dropped = [a.error for a in stream.answers if a.status is None]
    if dropped:
        problems.append(f"{stream.name}: {len(dropped)} transport errors, e.g. {dropped[:3]}")
    if stream.connects != 1:
        problems.append(f"{stream.name}: {stream.connects} TCP connections (keep-alive dropped)")
    if not any(a.status == 503 for a in stream.answers if stopped_at + 0.5 < a.at < restarted_at):
        problems.append(f"{stream.name}: no 503 while PostgreSQL was down")
    late = [a.status for a in stream.answers if a.at > restarted_at + RECOVERY_SECONDS]
    if not late or set(late) != {200}:
        problems.append(f"{stream.name}: not recovered {RECOVERY_SECONDS} s after the restart: {late[:20]}")
    return problems


async def test_postgres_stopped_under_load(outage_postgres: StoppablePostgres, setup: Setup) -> None:
    key = {"X-API-Key": setup.api_key}
    streams = []
    for broker in setup.brokers:
        for index in range(CLIENTS_PER_STREAM):
            streams += [
                Stream(f"{broker.name}/status-jwt-{index}", f"{broker.url}/status", user_headers()),
                Stream(f"{broker.name}/status-key-{index}", f"{broker.url}/status?tenant_id=tenant-a", key),
                Stream(
                    f"{broker.name}/token-key-{index}",
                    f"{broker.url}/connections/{setup.connection_id}/token",
                    key,
                ),
            ]
    stop = asyncio.Event()
    load = [asyncio.create_task(stream.run(stop)) for stream in streams]
    try:
        await asyncio.sleep(1.5)  # steady state: caches on, connections open
        await asyncio.to_thread(outage_postgres.stop)
        stopped_at = time.monotonic()
        await asyncio.sleep(1.0)
        assert {await _ready(b.url) for b in setup.brokers} == {503}
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
        await asyncio.to_thread(outage_postgres.start)
        restarted_at = time.monotonic()
        await asyncio.sleep(RECOVERY_SECONDS + 1.0)
    finally:
        stop.set()
        await asyncio.gather(*load)
    problems = [problem for stream in streams for problem in _summary(stream, stopped_at, restarted_at)]
    assert not problems, "\n".join(problems) + "\n" + "\n".join(b.output(3000) for b in setup.brokers)
    assert {await _ready(b.url) for b in setup.brokers} == {200}

    # The change feeds listen again: caches are back on, and a change made through one replica
    # reaches the other's cached /status at once.
    async with httpx.AsyncClient(timeout=10) as http:
        for broker in setup.brokers:

            async def back(broker: BrokerProcess = broker) -> bool:
                return await _caches_back(http, broker, setup)

            await until(back, f"caches back on in broker {broker.name}", within=10)
        a, b = setup.brokers
        status_b = f"{b.url}/status"
        assert (await http.get(status_b, headers=user_headers())).json()["accounting_link"] == "disabled"
        changed = await http.patch(
            f"{a.url}/connections/{setup.connection_id}",
            json={"modules": {"accounts_receivable": True}},
            headers=user_headers(),
        )
        assert changed.status_code == 200, changed.text

        async def seen_by_b() -> bool:
            body = (await http.get(status_b, headers=user_headers())).json()
            return bool(body["accounting_link"] == "enabled")

        await until(seen_by_b, "the change reaching the other replica", within=1.0)
