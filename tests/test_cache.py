"""Read caches stay truthful across replicas: PostgreSQL NOTIFY reaches every process at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from service.core.cache import VersionedCache
from tests.conftest import Stack, user_headers
from tests.support.db_helpers import execute
from tests.support.processes import BrokerProcess, BrokerProcesses, settings_env
from tests.support.waiting import until


@pytest.fixture(scope="module")
async def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrokerProcess]:
    """A second broker process on the same database (the in-thread broker is the first)."""
    processes = BrokerProcesses(tmp_path_factory.mktemp("replica"))
    try:
        (broker,) = await processes.start(settings_env(stack.settings), "replica")
        yield broker
    finally:
        processes.close()


async def _eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """NOTIFY is delivered after commit, asynchronously: allow it a moment, no more."""
    await until(check, "the other replica to see the change", within=2.0)


async def test_disconnect_on_one_replica_is_seen_by_the_other(
    client, replica, new_connection, connect
) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    await client.patch(
        f"/connections/{conn['id']}", json={"modules": {"accounts_receivable": True}}, headers=user_headers()
    )
    async with httpx.AsyncClient(base_url=replica.url) as other:
        warm = (await other.get("/status", headers=user_headers())).json()
        assert warm["accounting_link"] == "enabled"
        disconnected = await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
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
    await client.patch(
        f"/connections/{conn['id']}", json={"modules": {"accounts_payable": True}}, headers=user_headers()
    )
    status = (await client.get("/status", headers=user_headers())).json()
    assert status["accounting_link"] == "enabled"  # no waiting: the writer dropped its own entry


async def test_refresh_and_revocation_reach_the_other_replica(
    client, replica, new_connection, connect, service_headers, stack
) -> None:
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
            return (await other.get(url, headers=headers)).json()["access_token"] == refreshed["access_token"]

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


async def test_concurrent_misses_share_one_load_and_a_change_starts_a_new_one() -> None:
    cache: VersionedCache[str, int] = VersionedCache()
    cache.enabled = True
    loads: list[asyncio.Event] = []
    version = 1

    async def load() -> int:
        release = asyncio.Event()
        loads.append(release)
        read = version  # what the database held when the read began
        await release.wait()
        return read

    early = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert len(loads) == 1  # fifty misses, one read
    version = 2
    cache.invalidate("k")  # a writer commits while that read is out
    late = asyncio.create_task(cache.get_or_load("k", load))  # e.g. the writer reading back
    await asyncio.sleep(0.01)
    assert len(loads) == 2  # it did not join the read that began before the change
    for release in loads:
        release.set()
    assert await asyncio.gather(*early) == [1] * 50
    assert await late == 2
    assert cache.get("k") == 2  # the stale read was not kept


async def test_a_failed_or_empty_load_caches_nothing() -> None:
    cache: VersionedCache[str, int] = VersionedCache()
    cache.enabled = True

    async def fail() -> int:
        await asyncio.sleep(0.01)
        raise ConnectionError("database unreachable")

    results = await asyncio.gather(*(cache.get_or_load("k", fail) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)

    async def missing() -> int | None:
        return None

    assert await cache.get_or_load("k", missing) is None
    assert cache.get("k") is None

    async def found() -> int:
        return 7

    assert await cache.get_or_load("k", found) == 7
    assert cache.get("k") == 7


async def test_a_truncate_empties_every_replicas_status(
    client, replica, new_connection, stack: Stack
) -> None:
    # Row triggers do not fire on TRUNCATE; a statement trigger tells every replica to drop all.
    await new_connection()
    async with httpx.AsyncClient(base_url=replica.url) as other:
        for broker in (client, other):
            assert len((await broker.get("/status", headers=user_headers())).json()["connections"]) == 1
        await execute(stack.database_url, "TRUNCATE connections CASCADE")
        for broker in (client, other):

            async def emptied(broker: httpx.AsyncClient = broker) -> bool:
                body = (await broker.get("/status", headers=user_headers())).json()
                return body["connections"] == []

            await _eventually(emptied)


async def test_using_an_api_key_notifies_no_replica_but_revoking_it_does(stack: Stack) -> None:
    import asyncpg

    from service.core.db.engine import asyncpg_dsn

    listener = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    heard: list[str] = []
    await listener.add_listener("qbo_broker_api_keys", lambda *args: heard.append(args[2]))
    try:
        await execute(
            stack.database_url,
            "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) "
            "VALUES (gen_random_uuid(), 'k', 'p', 'h-notify', '{status:read}')",
        )
        await until(lambda: _true(bool(heard)), "the insert to be notified", within=2.0)
        heard.clear()
        await execute(
            stack.database_url, "UPDATE api_keys SET last_used_at = now() WHERE key_hash = 'h-notify'"
        )
        await execute(
            stack.database_url, "UPDATE api_keys SET revoked_at = now() WHERE key_hash = 'h-notify'"
        )
        await until(lambda: _true(bool(heard)), "the revocation to be notified", within=2.0)
        # Notifications arrive in commit order: had the touch been notified, it would be first,
        # and there would be two.
        await asyncio.sleep(0.2)
        assert len(heard) == 1
    finally:
        await listener.close()


async def _true(value: bool) -> bool:
    return value
