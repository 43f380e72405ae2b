"""Background work: keep-alive refreshes, pending-link expiry, and clean shutdown."""

from __future__ import annotations

import asyncio

from service.worker import BackgroundWorker, expire_pending_links, keep_alive
from tests.conftest import ALICE, DAVE, user_headers
from tests.support.db_helpers import execute, fetchrow


async def test_keep_alive_refreshes_only_due_connections(
    client, new_connection, connect, emulator, runtime, stack
) -> None:
    due, fresh = await new_connection(), await new_connection(user="user-2")
    await connect(due["id"], email=ALICE, realm_id="9341452988354102")
    await connect(fresh["id"], email=DAVE, realm_id="9341452988354203", user="user-2")
    assert (await client.get(f"/connections/{fresh['id']}", headers=user_headers())).json()[
        "status"
    ] == "connected"
    await execute(
        stack.database_url,
        "UPDATE connections SET keepalive_due_at = now() - interval '1 minute' WHERE id = $1",
        due["id"],
    )
    before = await fetchrow(
        stack.database_url, "SELECT refresh_token, last_refreshed_at FROM connections WHERE id=$1", due["id"]
    )
    assert await keep_alive(runtime) == 1
    after = await fetchrow(
        stack.database_url,
        "SELECT refresh_token, last_refreshed_at, "
        "keepalive_due_at > now() AS rescheduled FROM connections WHERE id=$1",
        due["id"],
    )
    assert after["refresh_token"] != before["refresh_token"]
    assert after["last_refreshed_at"] > before["last_refreshed_at"]
    assert after["rescheduled"]
    assert await keep_alive(runtime) == 0  # nothing due any more
    stats = (await emulator.get("/stats")).json()
    assert stats["token"]["refresh_token"] == {"ok": 1}


async def test_keep_alive_marks_revoked_links(
    client, new_connection, connect, emulator, runtime, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    await emulator.post("/companies/9341452988354102/disconnect")
    await execute(
        stack.database_url, "UPDATE connections SET keepalive_due_at = now() WHERE id=$1", conn["id"]
    )
    assert await keep_alive(runtime) == 0
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "reauthorization_required"
    assert body["last_error"]["code"] == "invalid_grant"


async def test_expired_pending_links_are_revoked_and_dropped(
    client, new_connection, connect, emulator, runtime, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email="dave@example.com", realm_id="9341452988354102")
    await connect(conn["id"], email="dave@example.com", realm_id="9341452988354203")
    assert {g["realm_id"] for g in (await emulator.get("/grants")).json()} == {
        "9341452988354102",
        "9341452988354203",
    }
    assert await expire_pending_links(runtime) == 0  # not expired yet
    await execute(stack.database_url, "UPDATE pending_links SET expires_at = now() - interval '1 s'")
    assert await expire_pending_links(runtime) == 1
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["pending_link"] is None and body["status"] == "connected"
    assert {g["realm_id"] for g in (await emulator.get("/grants")).json()} == {"9341452988354102"}
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    # The revocation was sent after the expiry committed, and Intuit confirmed it.
    assert [e["type"] for e in events["items"][:2]] == ["revoked", "pending_link_expired"]
    assert events["items"][0]["details"] == {"reason": "pending_link_expired"}
    confirm = await client.post(f"/connections/{conn['id']}/pending-link/confirm", headers=user_headers())
    assert confirm.json()["code"] == "no_pending_link"


async def test_worker_runs_and_stops_cleanly(runtime) -> None:
    worker = BackgroundWorker(runtime)
    worker.start()
    await asyncio.sleep(0.2)
    await asyncio.wait_for(worker.stop(), timeout=5)
    assert worker._task is not None and worker._task.done()


async def test_keep_alive_skips_a_connection_another_replica_holds(
    new_connection, connect, emulator, runtime, stack
) -> None:
    import asyncpg

    from service.core.db.engine import asyncpg_dsn

    conn = await new_connection()
    await connect(conn["id"])
    await execute(
        stack.database_url, "UPDATE connections SET keepalive_due_at = now() WHERE id=$1", conn["id"]
    )
    other_replica = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        async with other_replica.transaction():
            await other_replica.execute("SELECT 1 FROM connections WHERE id=$1 FOR NO KEY UPDATE", conn["id"])
            assert await asyncio.wait_for(keep_alive(runtime), timeout=5) == 0  # did not wait
    finally:
        await other_replica.close()
    assert (await emulator.get("/stats")).json()["token"].get("refresh_token") is None
    assert await keep_alive(runtime) == 1  # free again: now it is refreshed
