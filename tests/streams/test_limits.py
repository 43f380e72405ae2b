"""What bounds a stream: caps per tenant and per process, a queue per stream, heartbeats, and
the server's shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack

import httpx
import pytest

from service.core.httpserver import server_options
from service.main import create_app
from service.streams.hub import StreamEvent, StreamHub, StreamLimitReached, Subscription
from tests.conftest import Stack, broker_settings, user_headers
from tests.streams.conftest import stream
from tests.support.servers import ThreadedServer, free_port

Emit = Callable[..., Awaitable[str]]


@pytest.fixture(scope="module")
def small_broker(stack: Stack) -> Iterator[str]:
    """A broker allowing two streams per tenant and three in all, with a fast heartbeat."""
    port = free_port()
    settings = broker_settings(
        stack.database_url,
        port,
        stack.emulator_url,
        BROKER_STREAMS_PER_TENANT=2,
        BROKER_STREAMS_MAX=3,
        BROKER_STREAM_HEARTBEAT_SECONDS=0.2,
    )
    broker = ThreadedServer(create_app(settings), port).start()
    yield broker.url
    broker.stop()


async def test_streams_are_capped_per_tenant_and_per_process(small_broker: str) -> None:
    async with AsyncExitStack() as streams, httpx.AsyncClient(base_url=small_broker, timeout=10) as http:
        for user in ("user-1", "user-2"):
            await streams.enter_async_context(stream(small_broker, "/status/stream", user_headers(user=user)))
        third = await http.get("/status/stream", headers=user_headers(user="user-3"))
        assert third.status_code == 429
        assert third.json()["code"] == "too_many_streams"
        assert int(third.headers["retry-after"]) > 0
        await streams.enter_async_context(
            stream(small_broker, "/status/stream", user_headers(tenant="tenant-b"))
        )
        full = await http.get("/status/stream", headers=user_headers(tenant="tenant-c"))
        assert full.status_code == 503
        assert full.json()["code"] == "streams_unavailable"
        assert int(full.headers["retry-after"]) > 0
    # Closed by their clients: the slots are free again (once the broker has seen them go).
    async with asyncio.timeout(10):
        while True:
            async with (
                httpx.AsyncClient(base_url=small_broker, timeout=10) as http,
                http.stream("GET", "/status/stream", headers=user_headers()) as again,
            ):
                if again.status_code == 200:
                    break
            await asyncio.sleep(0.05)


async def test_an_idle_stream_gets_heartbeats(small_broker: str) -> None:
    async with stream(small_broker, "/status/stream", user_headers()) as events:
        assert (await events.next_message()).retry == 3000  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            heartbeat = await events.next_message()
    assert heartbeat is not None and heartbeat.comments == ["heartbeat"]
    assert heartbeat.event is None


def _event(seq: int) -> StreamEvent:
    return StreamEvent(
        seq=seq,
        id=str(uuid.uuid4()),
        type="connection.modules_changed",
        tenant_id="t",
        connection_id=None,
        message=b"",
    )


async def test_a_stream_that_falls_behind_is_ended_not_grown() -> None:
    subscription = Subscription("t", None, asyncio.Queue(3))
    for seq in range(3):
        subscription.offer(_event(seq))
    assert not subscription.closed
    subscription.offer(_event(3))  # one more than it holds
    assert subscription.overflowed and subscription.closed
    assert subscription.queue.qsize() <= 3
    drained = [subscription.queue.get_nowait() for _ in range(subscription.queue.qsize())]
    assert drained[-1] is None  # its writer ends the response
    subscription.offer(_event(4))
    assert subscription.queue.empty()


async def test_the_hub_refuses_streams_beyond_its_caps_and_after_close() -> None:
    hub = StreamHub(
        "postgresql://unused",
        None,
        channel="unused",
        queue_size=2,  # type: ignore[arg-type]
        max_streams=2,
        max_streams_per_tenant=1,
    )
    first = hub.subscribe("a", None)
    with pytest.raises(StreamLimitReached) as tenant:
        hub.subscribe("a", None)
    assert tenant.value.scope == "tenant"
    hub.subscribe("b", None)
    with pytest.raises(StreamLimitReached) as process:
        hub.subscribe("c", None)
    assert process.value.scope == "process"
    hub.unsubscribe(first)
    hub.unsubscribe(first)  # twice: counted once
    assert hub.open_streams == 1
    await hub.close()
    with pytest.raises(StreamLimitReached):
        hub.subscribe("a", None)


async def test_shutdown_ends_open_streams_instead_of_waiting_for_them(stack: Stack) -> None:
    port = free_port()
    settings = broker_settings(stack.database_url, port, stack.emulator_url)
    # serve's protocol (service.core.httpserver), which tells a stream that the server stops.
    server = ThreadedServer(create_app(settings), port, **server_options()).start()
    try:
        async with stream(server.url, "/status/stream", user_headers()) as events:
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            # The response ends completely (a cut one would raise here), with no event.
            assert await events.events_until_end(seconds=10) == []
            await stopping
        assert not server.running
    finally:
        if server.running:
            server.stop()
