"""Failures nobody caused on purpose: a database that cannot be reached answers 503
database_unavailable with Retry-After, anything else a 500 internal_error; both carry the
request id, are logged once under it, and leave the caller's keep-alive connection open."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from fastapi import Depends, FastAPI

from service.core.db import engine as db_engine
from service.core.db.engine import asyncpg_dsn, build_engine
from service.core.errors import database_unreachable
from service.main import create_app
from tests.conftest import Stack, user_headers
from tests.support.logs import captured_json_logs
from tests.support.servers import ThreadedServer, free_port

ORIGIN = "https://app.cietrade.test"  # in the test settings' CORS origins


def _closed_port_dsn() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


async def _unreachable_now() -> BaseException:
    """What asyncpg raises for a server that refuses connections."""
    try:
        await asyncpg.connect(_closed_port_dsn(), timeout=5)
    except Exception as exc:
        return exc
    raise AssertionError("connected to a closed port")


async def _terminated(database_url: str) -> asyncpg.Connection:
    """A connection whose session the server has ended (as a restart or failover does)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
    finally:
        await admin.close()
    await asyncio.sleep(0.1)
    return conn


async def _raised(action: Any) -> BaseException:
    try:
        await action()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


async def test_recognises_an_unreachable_database(database_url: str) -> None:
    """Real failures, each produced against a real server (or a port where none listens)."""
    unreachable: dict[str, BaseException] = {}
    unreachable["refused"] = await _unreachable_now()
    conn = await _terminated(database_url)
    unreachable["session ended by the server"] = await _raised(lambda: conn.fetchval("SELECT 1"))
    unreachable["closed connection"] = await _raised(lambda: conn.fetchval("SELECT 1"))
    await conn.close()

    engine = build_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as sa_conn:
            pid = (await sa_conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            admin = await asyncpg.connect(asyncpg_dsn(database_url))
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await admin.close()
            await asyncio.sleep(0.1)
            unreachable["SQLAlchemy, session ended"] = await _raised(
                lambda: sa_conn.execute(sa.text("SELECT 1"))
            )
        async with engine.connect() as sa_conn:
            await sa_conn.execute(sa.text("SET statement_timeout = 50"))
            unreachable["SQLAlchemy, statement timeout"] = await _raised(
                lambda: sa_conn.execute(sa.text("SELECT pg_sleep(2)"))
            )
    finally:
        await engine.dispose()
    refused_engine = build_engine(_closed_port_dsn(), pool_size=1)
    try:
        async with refused_engine.connect() as sa_conn:
            unreachable["SQLAlchemy, refused"] = await _raised(lambda: sa_conn.execute(sa.text("SELECT 1")))
    except Exception as exc:  # raised at connect
        unreachable["SQLAlchemy, refused"] = exc
    finally:
        await refused_engine.dispose()
    busy = build_engine(database_url, pool_size=1)
    busy.pool._max_overflow = 0  # type: ignore[attr-defined]
    busy.pool._timeout = 0.05  # type: ignore[attr-defined]
    try:
        async with busy.connect():
            unreachable["SQLAlchemy pool, no connection in time"] = await _raised(busy.connect)
    finally:
        await busy.dispose()
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=1)
    try:
        async with pool.acquire():
            unreachable["asyncpg pool, no connection in time"] = await _raised(
                lambda: pool.acquire(timeout=0.05)
            )
    finally:
        await pool.close()
    unreachable["server starting up"] = asyncpg.exceptions.CannotConnectNowError(
        "the database system is starting up"
    )

    bugs: dict[str, BaseException] = {}
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        bugs["syntax error"] = await _raised(lambda: admin.execute("SELEC 1"))
        bugs["unique violation"] = await _raised(
            lambda: admin.execute("CREATE TEMP TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (1)")
        )
    finally:
        await admin.close()
    engine = build_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as sa_conn:
            bugs["SQLAlchemy, syntax error"] = await _raised(lambda: sa_conn.execute(sa.text("SELEC 1")))
    finally:
        await engine.dispose()
    bugs["a plain bug"] = RuntimeError("boom")
    bugs["a lookup"] = KeyError("connection")

    assert {name: exc for name, exc in unreachable.items() if not database_unreachable(exc)} == {}
    assert {name: exc for name, exc in bugs.items() if database_unreachable(exc)} == {}
    assert isinstance(unreachable["SQLAlchemy pool, no connection in time"], sqlalchemy.exc.TimeoutError)


async def test_a_silent_server_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts and never answers (a host gone behind a network cut) fails the
    request after the connect timeout, as unreachable, not after asyncpg's minute."""
    monkeypatch.setattr(db_engine, "CONNECT_TIMEOUT_SECONDS", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        engine = build_engine(f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x", pool_size=1)
        started = time.monotonic()
        try:
            async with asyncio.timeout(10) as guard:
                failure = await _raised(lambda: _select_one(engine))
        finally:
            await engine.dispose()
    assert not guard.expired()
    assert time.monotonic() - started < 3
    assert database_unreachable(failure), repr(failure)


async def _select_one(engine: Any) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))


# -- through the app ---------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    with captured_json_logs(logging.INFO) as stream:
        yield stream


async def _refused_dependency() -> None:
    await asyncpg.connect(_closed_port_dsn(), timeout=5)


@pytest.fixture(scope="module")
def faulty_broker(stack: Stack) -> Iterator[str]:
    """The broker's app with three routes of its own that fail as nothing in the app should."""
    app: FastAPI = create_app(stack.settings)

    async def boom() -> None:
        raise RuntimeError("something the broker did not expect")

    async def lost_database() -> None:
        await asyncpg.connect(_closed_port_dsn(), timeout=5)

    async def lost_in_dependency(_: None = Depends(_refused_dependency)) -> None:
        return None

    async def token_route(connection_id: uuid.UUID) -> None:
        raise ValueError("a bug on the token path")

    app.add_api_route("/_test/boom", boom)
    app.add_api_route("/_test/database", lost_database)
    app.add_api_route("/_test/dependency", lost_in_dependency)
    app.add_api_route("/_test/{connection_id}/token", token_route)
    server = ThreadedServer(app, free_port()).start()
    yield server.url
    server.stop()


class Connects:
    """Counts the TCP connections a client opens."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, event: str, _info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.count += 1


@pytest.fixture
async def one_connection(faulty_broker: str) -> AsyncIterator[tuple[httpx.AsyncClient, Connects]]:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=faulty_broker, timeout=10, limits=limits) as http:
        yield http, Connects()


def _records(captured: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.getvalue().splitlines() if line.strip()]


async def test_an_unexpected_error_answers_500_with_the_request_id(
    one_connection: tuple[httpx.AsyncClient, Connects], captured: io.StringIO
) -> None:
    http, connects = one_connection
    answers = [
        await http.get("/_test/boom", headers={"Origin": ORIGIN}, extensions={"trace": connects})
        for _ in range(3)
    ]
    for answer in answers:
        assert answer.status_code == 500
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "internal_error"
        assert "something" not in answer.text  # no detail of the exception
        assert answer.headers["x-request-id"]
        assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert connects.count == 1, "the server closed the keep-alive connection"
    records = _records(captured)
    for answer in answers:
        mine = [r for r in records if r["request_id"] == answer.headers["x-request-id"]]
        errors = [r for r in mine if r["level"] == "error"]
        assert len(errors) == 1, mine
        assert errors[0]["message"] == "unhandled RuntimeError on GET /_test/boom"
        assert errors[0]["exception"].count("Traceback (most recent call last)") == 1
    assert not [r for r in records if "Exception in ASGI application" in r["message"]]


async def test_the_error_class_survives_redaction_on_a_token_path(
    one_connection: tuple[httpx.AsyncClient, Connects], captured: io.StringIO
) -> None:
    http, _ = one_connection
    answer = await http.get(f"/_test/{uuid.uuid4()}/token")
    assert answer.status_code == 500
    errors = [
        r
        for r in _records(captured)
        if r["request_id"] == answer.headers["x-request-id"] and r["level"] == "error"
    ]
    assert [r["message"] for r in errors] == ["unhandled ValueError on GET /_test/{connection_id}/token"]


@pytest.mark.parametrize("path", ["/_test/database", "/_test/dependency"])
async def test_an_unreachable_database_answers_503(
    one_connection: tuple[httpx.AsyncClient, Connects], captured: io.StringIO, path: str
) -> None:
    http, connects = one_connection
    answers = [
        await http.get(path, headers={"Origin": ORIGIN, **user_headers()}, extensions={"trace": connects})
        for _ in range(3)
    ]
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "database_unavailable"
        assert answer.headers["retry-after"] == "5"
        assert answer.headers["x-request-id"]
        assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert connects.count == 1
    records = _records(captured)
    assert not [r for r in records if r["level"] == "error"], records
    assert not [r for r in records if "exception" in r]
