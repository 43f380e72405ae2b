"""At most BROKER_MAX_CONNECTIONS_PER_TENANT connections per tenant, also under concurrent
creates; GET /status lists at most that many."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from service.core.config import Settings
from service.main import create_app
from tests.conftest import TENANT, Stack, broker_settings, user_headers
from tests.support.db_helpers import execute, fetchrow
from tests.support.servers import ThreadedServer, free_port

LIMIT = 5


@pytest.fixture
async def capped(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a broker (on the test database) that allows LIMIT connections per tenant."""
    port = free_port()
    server = ThreadedServer(
        create_app(
            broker_settings(
                stack.database_url, port, stack.emulator_url, BROKER_MAX_CONNECTIONS_PER_TENANT=LIMIT
            )
        ),
        port,
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield http
    finally:
        server.stop()


def test_the_default_cap_is_20() -> None:
    assert Settings().max_connections_per_tenant == 20
    with pytest.raises(ValueError):
        Settings(BROKER_MAX_CONNECTIONS_PER_TENANT=0)  # type: ignore[call-arg]


async def _count(stack: Stack, tenant: str = TENANT) -> int:
    row = await fetchrow(
        stack.database_url, "SELECT count(*) AS n FROM connections WHERE tenant_id = $1", tenant
    )
    assert row is not None
    return int(row["n"])


async def test_the_cap_is_a_409_problem(capped: httpx.AsyncClient, stack: Stack, service_headers) -> None:
    client = capped
    created = [await client.post("/connections", json={}, headers=user_headers()) for _ in range(LIMIT)]
    assert [r.status_code for r in created] == [201] * LIMIT
    refused = await client.post("/connections", json={}, headers=user_headers())
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert (body["code"], body["status"], body["limit"]) == ("connection_limit_reached", 409, LIMIT)
    # A service is held to the same cap; another tenant is not affected.
    writer = await service_headers("connections:write")
    assert (await client.post("/connections", json={"tenant_id": TENANT}, headers=writer)).status_code == 409
    assert (
        await client.post("/connections", json={"tenant_id": "tenant-b"}, headers=writer)
    ).status_code == 201
    # Deleting one frees a slot.
    gone = await client.delete(f"/connections/{created[0].json()['id']}", headers=user_headers())
    assert gone.status_code == 204
    assert (await client.post("/connections", json={}, headers=user_headers())).status_code == 201
    assert await _count(stack) == LIMIT


async def test_concurrent_creates_do_not_share_the_last_slot(capped: httpx.AsyncClient, stack: Stack) -> None:
    client = capped
    for _ in range(LIMIT - 1):
        assert (await client.post("/connections", json={}, headers=user_headers())).status_code == 201
    for attempt in range(3):  # the last slot, then none, raced each time by many callers
        answers = await asyncio.gather(
            *(client.post("/connections", json={}, headers=user_headers(user=f"user-{n}")) for n in range(12))
        )
        statuses = sorted(r.status_code for r in answers)
        assert statuses == ([201] + [409] * 11 if attempt == 0 else [409] * 12), statuses
        assert await _count(stack) == LIMIT


async def test_status_lists_at_most_the_cap(capped: httpx.AsyncClient, stack: Stack) -> None:
    client = capped
    # As if the cap had been lowered after the tenant made more: rows written directly.
    await execute(
        stack.database_url,
        "INSERT INTO connections (id, tenant_id, status) SELECT gen_random_uuid(), $1, "
        "'pending' FROM generate_series(1, $2)",
        TENANT,
        LIMIT + 7,
    )
    status = (await client.get("/status", headers=user_headers())).json()
    assert len(status["connections"]) == LIMIT
    listed = (await client.get("/connections", params={"limit": 100}, headers=user_headers())).json()
    assert len(listed["items"]) == LIMIT + 7  # the paginated list shows them all


async def test_a_create_waits_for_one_in_flight_for_the_same_tenant(runtime, stack: Stack) -> None:
    """Two transactions creating the tenant's last connection at once: the second counts only
    after the first commits, and is refused."""
    from service.auth.callers import Caller
    from service.connections import service
    from service.core.errors import ConnectionLimitReached

    await execute(
        stack.database_url,
        "INSERT INTO connections (id, tenant_id, status) SELECT gen_random_uuid(), $1, "
        "'pending' FROM generate_series(1, $2)",
        TENANT,
        LIMIT - 1,
    )
    caller = Caller(kind="user", subject="user-1", tenant_id=TENANT)
    async with runtime.sessionmaker() as first, runtime.sessionmaker() as second:
        await first.begin()
        await second.begin()
        await service.create(first, tenant_id=TENANT, caller=caller, limit=LIMIT)
        racing = asyncio.create_task(service.create(second, tenant_id=TENANT, caller=caller, limit=LIMIT))
        await asyncio.sleep(0.5)
        assert not racing.done(), "the second create did not wait for the first"
        # Another tenant's create does not wait.
        async with runtime.sessionmaker() as other, other.begin():
            await asyncio.wait_for(
                service.create(other, tenant_id="tenant-b", caller=caller, limit=LIMIT), timeout=2
            )
        await first.commit()
        try:
            await asyncio.wait_for(racing, timeout=5)
        except ConnectionLimitReached:
            pass
        else:
            raise AssertionError("the second create took a slot that was gone")
        await second.rollback()
    assert await _count(stack) == LIMIT
