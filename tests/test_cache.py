"""Read caches stay truthful across replicas: PostgreSQL NOTIFY reaches every process at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from service.cache import VersionedCache
from tests.conftest import Stack, user_headers
from tests.support.db_helpers import execute
from tests.support.processes import BrokerProcess, BrokerProcesses, settings_env


@pytest.fixture(scope="module")
async def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrokerProcess]:
    """A second broker process on the same database (the in-thread broker is the first)."""
    processes = BrokerProcesses(tmp_path_factory.mktemp("replica"))
    try:
        (broker,) = await processes.start(settings_env(stack.settings), "replica")
        yield broker
    finally:
        processes.close()


async def _eventually(check: Callable[[], object], seconds: float = 2.0) -> None:
    """NOTIFY is delivered after commit, asynchronously: allow it a moment, no more."""
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[misc]
        assert time.monotonic() < deadline, "the other replica never saw the change"
        await asyncio.sleep(0.02)


async def test_disconnect_on_one_replica_is_seen_by_the_other(client, replica, new_connection,
                                                              connect) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    await client.patch(f"/connections/{conn['id']}", json={"modules": {"accounts_receivable": True}},
                       headers=user_headers())
    async with httpx.AsyncClient(base_url=replica.url) as other:
        warm = (await other.get("/status", headers=user_headers())).json()
        assert warm["accounting_link"] == "enabled"
        disconnected = await client.post(f"/connections/{conn['id']}/disconnect",
                                         headers=user_headers())
        assert disconnected.status_code == 200
        started = time.monotonic()

        async def seen() -> bool:
            body = (await other.get("/status", headers=user_headers())).json()
            return body["accounting_link"] == "disabled"

        await _eventually(seen)
        assert time.monotonic() - started < 1.0


async def test_a_write_is_read_back_at_once_on_the_same_replica(client, new_connection, connect) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    assert (await client.get("/status", headers=user_headers())).json()["accounting_link"] == "disabled"
    await client.patch(f"/connections/{conn['id']}", json={"modules": {"accounts_payable": True}},
                       headers=user_headers())
    status = (await client.get("/status", headers=user_headers())).json()
    assert status["accounting_link"] == "enabled"  # no waiting: the writer dropped its own entry


async def test_refresh_and_revocation_reach_the_other_replica(client, replica, new_connection, connect,
                                                              service_headers, stack) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    headers = await service_headers("tokens:read")
    url = f"/connections/{conn['id']}/token"
    async with httpx.AsyncClient(base_url=replica.url) as other:
        first = (await other.get(url, headers=headers)).json()["access_token"]
        assert (await other.get(url, headers=headers)).json()["access_token"] == first
        refreshed = (await client.get(url, params={"force_refresh": "true"}, headers=headers)).json()
        assert refreshed["access_token"] != first

        async def new_token() -> bool:
            return (await other.get(url, headers=headers)).json()["access_token"] == refreshed[
                "access_token"]

        await _eventually(new_token)
        await execute(stack.database_url, "UPDATE api_keys SET revoked_at = now()")

        async def refused() -> bool:
            return (await other.get(url, headers=headers)).status_code == 401

        await _eventually(refused)


def test_a_stale_read_cannot_overwrite_a_newer_invalidation() -> None:
    cache: VersionedCache[str, int] = VersionedCache()
    cache.enabled = True
    ticket = cache.ticket()  # a reader starts reading version 1 from the database …
    cache.invalidate("k")  # … a writer commits version 2 meanwhile …
    cache.put("k", 1, ticket)  # … and the reader's version 1 must not be kept
    assert cache.get("k") is None
    fresh = cache.ticket()
    cache.put("k", 2, fresh)
    assert cache.get("k") == 2
    cache.clear()
    cache.put("k", 2, fresh)  # a ticket from before a clear is refused too
    assert cache.get("k") is None
    cache.enabled = False
    cache.put("k", 3, cache.ticket())
    assert cache.get("k") is None


async def test_a_deleted_connection_leaves_the_status_at_once(client, new_connection) -> None:
    conn = await new_connection()
    listed = (await client.get("/status", headers=user_headers())).json()
    assert [c["id"] for c in listed["connections"]] == [conn["id"]]
    assert (await client.delete(f"/connections/{conn['id']}", headers=user_headers())).status_code == 204
    assert (await client.get("/status", headers=user_headers())).json()["connections"] == []
