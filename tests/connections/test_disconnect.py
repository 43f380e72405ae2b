"""Disconnect: revoke at Intuit, wipe tokens, remember the owner; never lose a revocation."""

from __future__ import annotations

import asyncio
import gc
import time

import httpx

from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.db.engine import build_engine, build_sessionmaker
from service.intuit.client import IntuitClient
from service.tokens.revocation import retry_pending_revocations
from tests.conftest import ALICE, user_headers
from tests.support.db_helpers import execute, fetchrow
from tests.support.waiting import until


async def test_disconnect_revokes_wipes_and_remembers_owner(
    client, new_connection, connect, emulator, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    assert len((await emulator.get("/grants")).json()) == 1
    response = await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "disconnected"
    assert body["disconnected_at"] is not None
    assert body["owner"]["quickbooks_user"]["email"] == ALICE  # the last owner is remembered
    assert body["access_token_expires_at"] is None and body["accounting_link"] == "disabled"
    assert (await emulator.get("/grants")).json() == []  # revoked at Intuit
    row = await fetchrow(
        stack.database_url, "SELECT access_token, refresh_token FROM connections WHERE id=$1", conn["id"]
    )
    assert row["access_token"] is None and row["refresh_token"] is None
    again = await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    assert again.status_code == 200 and again.json()["status"] == "disconnected"
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    # Queued with the disconnect, sent once it committed, confirmed by Intuit: newest first.
    assert [e["type"] for e in events["items"][:2]] == ["revoked", "disconnected"]
    assert events["items"][0]["details"] == {"reason": "disconnected"}
    assert events["items"][1]["details"]["revocation_queued"] is True
    assert (await fetchrow(stack.database_url, "SELECT count(*) AS n FROM pending_revocations"))["n"] == 0
    # Connecting again afterwards works, with the same QuickBooks user, without confirmation.
    relinked = await connect(conn["id"])
    assert relinked.params["result"] == "connected"


async def test_disconnecting_a_never_linked_connection_is_not_connected(client, new_connection) -> None:
    conn = await new_connection()
    response = await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    assert response.status_code == 409 and response.json()["code"] == "not_connected"


async def test_revocation_is_queued_when_intuit_is_down_and_retried(
    client, new_connection, connect, emulator, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    await emulator.post("/faults", json={"endpoint": "revoke", "kind": "status", "status": 503, "count": 50})
    response = await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    assert response.status_code == 200 and response.json()["status"] == "disconnected"
    queued = await fetchrow(stack.database_url, "SELECT * FROM pending_revocations")
    assert queued is not None and queued["reason"] == "disconnected"
    assert not queued["token"].startswith("ey")  # stored encrypted
    assert (await emulator.get("/grants")).json() != []  # still live at Intuit, for now

    await emulator.delete("/faults")
    await execute(stack.database_url, "UPDATE pending_revocations SET next_attempt_at = now()")
    settings: Settings = stack.settings
    engine = build_engine(stack.database_url, pool_size=2)
    intuit = IntuitClient(settings)
    try:
        done = await retry_pending_revocations(
            build_sessionmaker(engine), intuit, SecretBox(settings.parsed_encryption_keys)
        )
    finally:
        await intuit.aclose()
        await engine.dispose()
    assert done == 1
    assert (await emulator.get("/grants")).json() == []
    assert await fetchrow(stack.database_url, "SELECT * FROM pending_revocations") is None


async def test_events_paginate_newest_first(client, new_connection, connect) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    for flag in (True, False, True):
        await client.patch(
            f"/connections/{conn['id']}", json={"modules": {"accounts_payable": flag}}, headers=user_headers()
        )
    first = (
        await client.get(f"/connections/{conn['id']}/events", params={"limit": 2}, headers=user_headers())
    ).json()
    assert [e["type"] for e in first["items"]] == ["modules_changed", "modules_changed"]
    rest = (
        await client.get(
            f"/connections/{conn['id']}/events",
            params={"limit": 10, "cursor": first["next_cursor"]},
            headers=user_headers(),
        )
    ).json()
    types = [e["type"] for e in rest["items"]]
    assert types == ["modules_changed", "linked", "created"]
    assert rest["next_cursor"] is None
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids, reverse=True)
    linked = rest["items"][1]
    assert linked["actor"] == "user:user-1"
    assert linked["details"]["quickbooks_user"]["email"] == ALICE
    assert linked["details"]["forced"] is False


async def test_ops_endpoints(client: httpx.AsyncClient, new_connection, connect) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    conn = await new_connection()
    await connect(conn["id"])
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'qbo_broker_connections{status="connected"} 1.0' in text
    assert 'qbo_broker_encrypted_secrets{key_id="k1"} 2.0' in text
    assert "qbo_broker_intuit_calls_total" in text
    assert 'qbo_broker_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert response_has_request_id(ready)


def response_has_request_id(response: httpx.Response) -> bool:
    return bool(response.headers.get("x-request-id"))


async def test_a_slow_revocation_at_intuit_holds_no_lock(
    client, new_connection, connect, emulator, stack
) -> None:
    # The disconnect commits first and revokes after: while Intuit takes 4 s to answer, the
    # connection's row is free, and a PATCH of it answers at once.
    conn = await new_connection()
    await connect(conn["id"])
    # The same PATCH once beforehand, so the one measured below is not the first of its kind
    # (statements compiled and cached, pool warm): what is left is any wait on a lock.
    warm = await client.patch(
        f"/connections/{conn['id']}", headers=user_headers(), json={"modules": {"accounts_payable": True}}
    )
    assert warm.status_code == 200, warm.text
    await emulator.post("/faults", json={"endpoint": "revoke", "kind": "timeout", "delay_s": 4})
    disconnecting = asyncio.create_task(
        client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    )

    async def revoking() -> bool:
        row = await fetchrow(stack.database_url, "SELECT status FROM connections WHERE id = $1", conn["id"])
        return row["status"] == "disconnected"

    await until(revoking, "the disconnect to commit", within=3.0)
    patched, elapsed = await _timed_patch(client, conn["id"], {"accounts_receivable": True})
    assert patched.status_code == 200, patched.text
    assert elapsed < 0.1, elapsed
    assert not disconnecting.done()  # Intuit is still answering the revocation
    assert (await disconnecting).status_code == 200
    assert (await emulator.get("/grants")).json() == []


async def test_a_slow_refresh_at_intuit_holds_no_lock(
    client, new_connection, connect, emulator, service_headers
) -> None:
    # A forced refresh records its attempt in one statement, then waits on Intuit with nothing
    # locked and no transaction open: while Intuit takes 4 s to answer, a PATCH of the same
    # connection answers at once, and the refresh's outcome is stored after it.
    conn = await new_connection()
    await connect(conn["id"])
    tokens = await service_headers("tokens:read", name="token-reader")
    warm = await client.patch(
        f"/connections/{conn['id']}", headers=user_headers(), json={"modules": {"accounts_payable": True}}
    )
    assert warm.status_code == 200, warm.text
    before = (await client.get(f"/connections/{conn['id']}/token", headers=tokens)).json()
    await emulator.post("/faults", json={"endpoint": "token", "kind": "timeout", "delay_s": 4})
    refreshing = asyncio.create_task(
        client.get(f"/connections/{conn['id']}/token?force_refresh=true", headers=tokens)
    )

    await asyncio.sleep(0.5)  # the refresh is at Intuit, waiting out the delay
    assert not refreshing.done()
    patched, elapsed = await _timed_patch(client, conn["id"], {"accounts_receivable": True})
    assert patched.status_code == 200, patched.text
    assert patched.json()["modules"] == {"accounts_receivable": True, "accounts_payable": True}
    assert elapsed < 0.1, elapsed
    assert not refreshing.done()  # Intuit is still answering the refresh
    refreshed = await refreshing
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["access_token"] != before["access_token"]
    after = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert after["modules"] == {"accounts_receivable": True, "accounts_payable": True}


async def _timed_patch(
    client: httpx.AsyncClient, connection_id: str, modules: dict[str, bool]
) -> tuple[httpx.Response, float]:
    """A PATCH of the connection's modules, three times in a row, and the shortest time one took:
    a PATCH waiting on a lock held while Intuit answers would wait seconds each time, while the
    machine being busy for a moment delays only one of them. The broker runs in this process: a
    full garbage collection of the suite's heap in the middle would be measured too, and it is
    no lock."""
    gc.collect()
    gc.disable()
    try:
        times = []
        for _ in range(3):
            started = time.monotonic()
            patched = await client.patch(
                f"/connections/{connection_id}", headers=user_headers(), json={"modules": modules}
            )
            times.append(time.monotonic() - started)
            assert patched.status_code == 200, patched.text
        return patched, min(times)
    finally:
        gc.enable()
