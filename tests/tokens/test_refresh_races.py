"""What else can happen while a refresh waits on Intuit: the row changes under it, or the
session holding its lock is lost. And the locks themselves, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

from service.core.db.engine import asyncpg_dsn
from service.core.errors import IntuitUnavailableProblem
from service.tokens.locks import Hold, RefreshLocks, lock_key
from tests.conftest import COMPANY_1, user_headers
from tests.support.db_helpers import expire_access_token, fetchrow
from tests.support.waiting import until


async def _holder(database_url: str, key: int) -> int | None:
    """The backend holding an advisory lock (a bigint key shows as its high and low 32 bits)."""
    row = await fetchrow(
        database_url,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
        "AND granted AND ((classid::bigint << 32) | objid::bigint) = $1",
        key,
    )
    return None if row is None else int(row["pid"])


async def _end_backend(database_url: str, pid: int | None) -> None:
    """End a session at the server, as a crash or a cut connection would."""
    assert pid is not None
    ended = await fetchrow(database_url, "SELECT pg_terminate_backend($1) AS ok", pid)
    assert ended is not None and ended["ok"]


async def test_a_disconnect_while_intuit_answers_a_refresh_stands(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    await emulator.post("/config", json={"latency_ms": 1500})
    await expire_access_token(stack.database_url, cid)
    asked = asyncio.create_task(client.get(f"/connections/{cid}/token", headers=headers))

    async def refreshing() -> bool:
        stats = (await emulator.get("/stats")).json()
        return bool(stats["in_flight_refresh"].get(COMPANY_1) == 1)

    await until(refreshing, "the refresh to reach Intuit", within=10.0)
    # The refresh holds no row lock while Intuit answers: the disconnect goes ahead at once.
    disconnected = await client.post(f"/connections/{cid}/disconnect", headers=user_headers())
    assert disconnected.status_code == 200, disconnected.text
    answer = await asked
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "not_connected"
    row = await fetchrow(
        stack.database_url,
        "SELECT status, access_token, refresh_token, keepalive_due_at FROM connections WHERE id = $1",
        cid,
    )
    assert row is not None and dict(row) == {
        "status": "disconnected",
        "access_token": None,
        "refresh_token": None,
        "keepalive_due_at": None,
    }
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert [e["type"] for e in events["items"][:2]] == ["revoked", "disconnected"]
    assert "refreshed" not in [e["type"] for e in events["items"]]
    left = await fetchrow(
        stack.database_url,
        "SELECT count(*) AS n FROM refresh_attempts WHERE connection_id = $1",
        cid,
    )
    assert left is not None and left["n"] == 0


async def test_losing_the_lock_session_mid_refresh_loses_nothing(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    await emulator.post("/config", json={"latency_ms": 1000})
    await expire_access_token(stack.database_url, cid)
    asked = asyncio.create_task(client.get(f"/connections/{cid}/token", headers=headers))
    key = lock_key(uuid.UUID(cid))

    async def locked() -> bool:
        return await _holder(stack.database_url, key) is not None

    await until(locked, "the refresh to take its lock", within=10.0)
    await _end_backend(stack.database_url, await _holder(stack.database_url, key))
    # The refresh still stores what Intuit sends: the row holds the token it sent.
    answer = await asked
    assert answer.status_code == 200, answer.text
    stats = (await emulator.get("/stats")).json()["token"]["refresh_token"]
    assert stats == {"ok": 1}
    # And the next refresh takes a lock on a new session, with nothing stuck.
    await emulator.post("/config", json={"latency_ms": 0})
    forced = await client.get(f"/connections/{cid}/token", params={"force_refresh": "true"}, headers=headers)
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
        # Asked for twice in one process (a request and a keep-alive pass), the second time
        # while the first ask is out at the server: one grant.
        asking = asyncio.create_task(one.acquire(first))
        # Step the loop until the round carrying the first ask is at the server (a round on a
        # local server is over within milliseconds: no coarser wait can catch it out).
        while not one._asking:  # noqa: ASYNC110
            await asyncio.sleep(0)
        assert await one.acquire(first) is None
        hold = await asking
        assert hold is not None and hold.valid
        assert await one.acquire(first) is None  # never nested
        assert await other.acquire(first) is None
        assert await other.acquire(second) is not None  # per connection
        one.release(hold)  # returns at once; the unlock goes out with the next round
        assert not hold.valid

        async def taken_by(locks: RefreshLocks) -> bool:
            grant = await locks.acquire(first)
            if grant is not None:
                held.append(grant)
            return grant is not None

        held: list[Hold] = []
        await until(lambda: taken_by(other), "the released lock to be free", within=10.0)
        other.release(held.pop())
        await until(lambda: taken_by(one), "the lock to be free again", within=10.0)
        lost = held.pop()

        # The session ends (a crash, a cut connection): its locks go with it, at once.
        await _end_backend(stack.database_url, await _holder(stack.database_url, lock_key(first)))
        await until(lambda: taken_by(other), "the lock to be released with its session", within=10.0)

        async def forgotten() -> bool:
            return not lost.valid

        await until(forgotten, "the process that lost its session to learn it", within=10.0)
        other.release(held.pop())
        await until(lambda: taken_by(one), "the lock to be taken on a new session", within=10.0)
        current = held.pop()
        one.release(lost)  # a release of the lost grant must not touch the current one
        assert current.valid
        assert await other.acquire(first) is None
    finally:
        await one.close()
        await other.close()


async def test_shutdown_lets_a_refresh_under_way_store_its_tokens(runtime, linked, emulator, stack) -> None:
    cid = uuid.UUID(await linked())
    before = await fetchrow(stack.database_url, "SELECT refresh_token FROM connections WHERE id = $1", cid)
    await emulator.post("/config", json={"latency_ms": 800})
    await expire_access_token(stack.database_url, str(cid))
    view = await runtime.refresher.view(cid)
    asked = asyncio.create_task(runtime.refresher.access_token(view))

    async def refreshing() -> bool:
        stats = (await emulator.get("/stats")).json()
        return bool(stats["in_flight_refresh"].get(COMPANY_1) == 1)

    await until(refreshing, "the refresh to reach Intuit", within=10.0)
    asked.cancel()  # the request goes away, as on shutdown; the refresh must not
    await runtime.refresher.aclose()
    after = await fetchrow(
        stack.database_url, "SELECT refresh_token, status FROM connections WHERE id = $1", cid
    )
    assert after is not None and before is not None
    assert after["status"] == "connected" and after["refresh_token"] != before["refresh_token"]
    assert (await emulator.get("/stats")).json()["token"]["refresh_token"] == {"ok": 1}
    # Once closing, no new refresh starts.
    try:
        await runtime.refresher.access_token(view, force=True)
    except IntuitUnavailableProblem as refused:
        assert refused.headers["Retry-After"] == "1"
    else:
        raise AssertionError("a refresh started after shutdown began")


async def test_a_keep_alive_and_a_forced_request_in_one_process_refresh_once(
    runtime, linked, emulator, stack
) -> None:
    cid = uuid.UUID(await linked())
    await emulator.post("/config", json={"latency_ms": 300})
    await fetchrow(
        stack.database_url,
        "UPDATE connections SET keepalive_due_at = now() - interval '1 minute' WHERE id = $1 RETURNING id",
        cid,
    )
    view = await runtime.refresher.view(cid)
    before = (await emulator.get("/stats")).json()["token"].get("refresh_token", {})
    # Two refreshes of one connection with different rules, at once, in one process.
    kept, forced = await asyncio.gather(
        runtime.refresher.keep_alive(cid), runtime.refresher.access_token(view, force=True)
    )
    after = (await emulator.get("/stats")).json()["token"]["refresh_token"]
    assert after.get("ok", 0) == before.get("ok", 0) + 1  # one refresh served both
    assert after.get("invalid_grant", 0) == before.get("invalid_grant", 0)
    row = await fetchrow(
        stack.database_url,
        "SELECT access_token_expires_at, keepalive_due_at FROM connections WHERE id = $1",
        cid,
    )
    assert row is not None and forced.expires_at == row["access_token_expires_at"]
    assert row["keepalive_due_at"] > forced.expires_at  # no longer due
    # Whichever took the lock refreshed, and the other used its outcome: the keep-alive reports
    # a refresh exactly when the one 'refreshed' event is its own.
    events = await fetchrow(
        stack.database_url,
        "SELECT array_agg(actor) AS actors FROM "
        "connection_events WHERE connection_id = $1 AND type = 'refreshed'",
        cid,
    )
    assert events is not None and len(events["actors"]) == 1
    assert kept == (events["actors"][0] == "keepalive")
