"""Changes made through the API reach the streams as they commit, on every replica: a stream
on a second broker (same database) hears what was done through the first."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from service.main import create_app
from tests.conftest import TENANT, Stack, broker_settings, user_headers
from tests.streams.conftest import stream
from tests.support.intuit_user import CallbackResult
from tests.support.servers import ThreadedServer, free_port


@pytest.fixture(scope="module")
def replica_b(stack: Stack) -> Iterator[str]:
    port = free_port()
    broker = ThreadedServer(
        create_app(broker_settings(stack.database_url, port, stack.emulator_url)), port
    ).start()
    yield broker.url
    broker.stop()


async def test_a_change_through_one_replica_reaches_a_stream_on_another(
    stack: Stack, replica_b: str, client: httpx.AsyncClient
) -> None:
    async with stream(replica_b, "/status/stream", user_headers()) as events:
        created = await client.post("/connections", json={}, headers=user_headers())
        assert created.status_code == 201
        connection_id = created.json()["id"]
        message = await events.next_event()
    assert message.event == "connection.created"
    assert message.body["data"]["connection_id"] == connection_id
    assert message.body["data"]["tenant_id"] == TENANT
    assert message.body["data"]["status"] == "pending"


async def test_connect_and_modules_arrive_on_the_connection_stream_in_order(
    stack: Stack,
    replica_b: str,
    client: httpx.AsyncClient,
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
    connect: Callable[..., Awaitable[CallbackResult]],
) -> None:
    connection_id = (await new_connection())["id"]
    async with stream(replica_b, f"/connections/{connection_id}/stream", user_headers()) as events:
        await connect(connection_id)  # through the first broker, completed there
        connected = await events.next_event()
        patched = await client.patch(
            f"/connections/{connection_id}",
            headers=user_headers(),
            json={"modules": {"accounts_receivable": True}},
        )
        assert patched.status_code == 200
        modules = await events.next_event()
    assert connected.event == "connection.connected"
    assert connected.body["data"]["status"] == "connected"
    assert modules.event == "connection.modules_changed"
    assert modules.body["data"]["accounting_link"] == "enabled"


async def test_a_missed_change_is_replayed_on_the_other_replica(
    stack: Stack,
    replica_b: str,
    client: httpx.AsyncClient,
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    """The browser's stream drops; meanwhile a change is made; it reconnects to another replica
    with Last-Event-ID and gets what it missed."""
    connection_id = (await new_connection())["id"]
    async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
        await client.patch(
            f"/connections/{connection_id}",
            headers=user_headers(),
            json={"modules": {"accounts_payable": True}},
        )
        last = (await events.next_event()).id
    await client.patch(
        f"/connections/{connection_id}", headers=user_headers(), json={"modules": {"accounts_payable": False}}
    )
    assert last is not None
    async with stream(replica_b, "/status/stream", {**user_headers(), "Last-Event-ID": last}) as events:
        missed = await events.next_event()
    assert missed.event == "connection.modules_changed"
    assert missed.body["data"]["modules"]["accounts_payable"] is False
