"""Fixtures for outgoing webhooks: a broker that accepts local receivers, receivers, a sender
driven by a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from service.core.config import Settings
from service.core.db.engine import asyncpg_dsn
from service.events.delivery import WebhookSender
from service.main import create_app
from tests.conftest import Stack, broker_settings
from tests.support.receiver import Receiver, start_receiver
from tests.support.servers import ThreadedServer, free_port


class Clock:
    """Starts an hour ahead of the database (so whatever was written is due) and moves only
    when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def local_broker(stack: Stack) -> Iterator[tuple[str, Settings]]:
    """A broker on the stack's database that may send webhooks to local http receivers (as
    `qbo-broker dev` does); it sends nothing itself (its background work is off)."""
    port = free_port()
    settings = broker_settings(
        stack.database_url,
        port,
        stack.emulator_url,
        BROKER_WEBHOOK_ALLOW_PRIVATE=True,
        BROKER_WEBHOOK_CONCURRENCY_PER_ENDPOINT=3,
    )
    server = ThreadedServer(create_app(settings), port).start()
    yield server.url, settings
    server.stop()


@pytest.fixture
async def local(local_broker: tuple[str, Settings]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=local_broker[0], timeout=30) as http:
        yield http


@pytest.fixture
def receivers() -> Iterator[Callable[..., tuple[Receiver, str]]]:
    started: list[ThreadedServer] = []

    def make(**kwargs: Any) -> tuple[Receiver, str]:
        receiver = Receiver(**kwargs)
        server = start_receiver(receiver)
        started.append(server)
        return receiver, f"{server.url}/hooks"

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def senders(
    stack: Stack, local_broker: tuple[str, Settings], runtime: Any, clock: Clock
) -> AsyncIterator[Callable[..., WebhookSender]]:
    """Senders as replicas run them, each on a pool of its own, on the test's clock."""
    made: list[tuple[WebhookSender, asyncpg.Pool]] = []

    async def make(settings: Settings | None = None) -> WebhookSender:
        pool = await asyncpg.create_pool(asyncpg_dsn(stack.database_url), min_size=1, max_size=4)
        sender = WebhookSender(settings or local_broker[1], pool, runtime.box, clock=clock)
        made.append((sender, pool))
        return sender

    yield make  # type: ignore[misc]
    for sender, pool in made:
        await sender.aclose()
        await pool.close()
