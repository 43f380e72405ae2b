"""What else can happen while a refresh waits on Intuit: the row changes under it, or the
session holding its lock is lost. And the locks themselves, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from service.db.engine import asyncpg_dsn
from service.tokens.locks import RefreshLocks, lock_key
from tests.conftest import COMPANY_1, user_headers
from tests.support.db_helpers import expire_access_token, fetchrow


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _linked(new_connection, connect) -> str:
    conn = await new_connection()
    result = await connect(conn["id"])
    assert result.params["result"] == "connected"
    return str(conn["id"])


async def test_a_disconnect_while_intuit_answers_a_refresh_stands(
        client, new_connection, connect, service_headers, emulator, stack) -> None:
    cid = await _linked(new_connection, connect)
    headers = await service_headers("tokens:read")
    await emulator.post("/config", json={"latency_ms": 1500})
    await expire_access_token(stack.database_url, cid)
    asked = asyncio.create_task(client.get(f"/connections/{cid}/token", headers=headers))

    async def refreshing() -> bool:
        stats = (await emulator.get("/stats")).json()
        return bool(stats["in_flight_refresh"].get(COMPANY_1) == 1)

    await _until(refreshing, "the refresh to reach Intuit")
    # The refresh holds no row lock while Intuit answers: the disconnect goes ahead at once.
    disconnected = await client.post(f"/connections/{cid}/disconnect", headers=user_headers())
    assert disconnected.status_code == 200, disconnected.text
    answer = await asked
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "not_connected"
    row = await fetchrow(stack.database_url, "SELECT status, access_token, refresh_token, "
                         "keepalive_due_at FROM connections WHERE id = $1", cid)
    assert row is not None and dict(row) == {"status": "disconnected", "access_token": None,
                                             "refresh_token": None, "keepalive_due_at": None}
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert events["items"][0]["type"] == "disconnected"
    assert "refreshed" not in [e["type"] for e in events["items"]]
    left = await fetchrow(stack.database_url, "SELECT count(*) AS n FROM connection_events "
                          "WHERE connection_id = $1 AND type = 'refresh_attempt'", cid)
    assert left is not None and left["n"] == 0


async def test_losing_the_lock_session_mid_refresh_loses_nothing(
        client, new_connection, connect, service_headers, emulator, stack) -> None:
    cid = await _linked(new_connection, connect)
    headers = await service_headers("tokens:read")
    await emulator.post("/config", json={"latency_ms": 1000})
    await expire_access_token(stack.database_url, cid)
    asked = asyncio.create_task(client.get(f"/connections/{cid}/token", headers=headers))
    key = lock_key(uuid.UUID(cid))

    async def holder() -> int | None:
        # A bigint key shows as its high and low 32 bits (classid, objid).
        row = await fetchrow(stack.database_url, "SELECT pid FROM pg_locks WHERE locktype = "
                             "'advisory' AND granted AND ((classid::bigint << 32) | objid::bigint) "
                             "= $1", key)
        return None if row is None else int(row["pid"])

    async def locked() -> bool:
        return await holder() is not None

    await _until(locked, "the refresh to take its lock")
    pid = await holder()
    killed = await fetchrow(stack.database_url, "SELECT pg_terminate_backend($1) AS ok", pid)
    assert killed is not None and killed["ok"]
    # The refresh still stores what Intuit sends: the row holds the token it sent.
    answer = await asked
    assert answer.status_code == 200, answer.text
    stats = (await emulator.get("/stats")).json()["token"]["refresh_token"]
    assert stats == {"ok": 1}
    # And the next refresh takes a lock on a new session, with nothing stuck.
    await emulator.post("/config", json={"latency_ms": 0})
    forced = await client.get(f"/connections/{cid}/token", params={"force_refresh": "true"},
                              headers=headers)
    assert forced.status_code == 200, forced.text
    assert forced.json()["access_token"] != answer.json()["access_token"]
    assert (await emulator.get("/stats")).json()["token"]["refresh_token"] == {"ok": 2}
    body = (await client.get(f"/connections/{cid}", headers=user_headers())).json()
    assert body["status"] == "connected"


async def test_refresh_locks_exclude_other_processes_and_die_with_their_session(stack) -> None:
    dsn = asyncpg_dsn(stack.database_url)
    one, other = RefreshLocks(dsn), RefreshLocks(dsn)
    first, second = uuid.uuid4(), uuid.uuid4()
    try:
        assert await one.try_acquire(first)
        assert not await one.try_acquire(first)  # taken once per process, never nested
        assert not await other.try_acquire(first)
        assert await other.try_acquire(second)  # per connection
        await one.release(first)  # returns at once; the unlock goes out with the next round
        assert not one.held(first)

        async def taken_by_other() -> bool:
            return await other.try_acquire(first)

        await _until(taken_by_other, "the released lock to be free")
        await other.release(first)

        async def taken_by_one() -> bool:
            return await one.try_acquire(first)

        await _until(taken_by_one, "the lock to be free again")
        # The session ends (a crash, a cut connection): its locks go with it, at once.
        spy = await asyncpg.connect(dsn)
        try:
            pids = await spy.fetch("SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' "
                                   "AND pid <> pg_backend_pid()")
            for row in pids:
                await spy.execute("SELECT pg_terminate_backend($1)", row["pid"])
        finally:
            await spy.close()

        probe = RefreshLocks(dsn)
        try:
            async def taken_by_probe() -> bool:
                return await probe.try_acquire(first)

            await _until(taken_by_probe, "the lock to be released with its session")
        finally:
            await probe.close()
        # The process that lost its session learns it, and can lock again.
        await _until(lambda: _not_held(one, first), "the lost lock to be forgotten")
        assert await one.try_acquire(first)
    finally:
        await one.close()
        await other.close()


async def _not_held(locks: RefreshLocks, connection_id: uuid.UUID) -> bool:
    return not locks.held(connection_id)
