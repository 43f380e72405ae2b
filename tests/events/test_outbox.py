"""The outbox: every change of a connection writes its public event in the change's transaction."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from service.core.db.engine import asyncpg_dsn, transaction
from service.events import outbox
from service.store import connections as repo
from service.worker import expire_pending_links, keep_alive
from tests.conftest import COMPANY_1, COMPANY_2, DAVE, user_headers
from tests.support.db_helpers import execute


async def events_of(database_url: str, connection_id: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "SELECT id, seq, type, tenant_id, connection_id, data, occurred_at "
            "FROM events WHERE connection_id = $1 ORDER BY seq",
            uuid.UUID(connection_id),
        )
    finally:
        await conn.close()
    return [{**dict(r), "data": json.loads(r["data"])} for r in rows]


async def test_the_life_of_a_connection_is_published(client, new_connection, connect, stack) -> None:
    conn = await new_connection()
    assert (await connect(conn["id"])).params["result"] == "connected"
    patched = await client.patch(
        f"/connections/{conn['id']}", headers=user_headers(), json={"modules": {"accounts_receivable": True}}
    )
    assert patched.status_code == 200, patched.text
    assert (
        await client.post(f"/connections/{conn['id']}/disconnect", headers=user_headers())
    ).status_code == 200
    assert (await client.delete(f"/connections/{conn['id']}", headers=user_headers())).status_code == 204

    events = await events_of(stack.database_url, conn["id"])
    assert [e["type"] for e in events] == [
        "connection.created",
        "connection.connected",
        "connection.modules_changed",
        "connection.disconnected",
        "connection.deleted",
    ]
    assert all(e["tenant_id"] == "tenant-a" for e in events)
    assert len({e["id"] for e in events}) == len(events)
    created, connected, modules, disconnected, deleted = (e["data"] for e in events)
    assert created["status"] == "pending" and created["accounting_link"] == "disabled"
    assert connected["status"] == "connected" and connected["realm_id"] == COMPANY_1
    assert connected["owner"]["user_id"] == "user-1"
    assert connected["owner"]["quickbooks_user"]["email"] == "alice@example.com"
    assert modules["changed"] == {"accounts_receivable": True}
    assert modules["accounting_link"] == "enabled"
    assert modules["modules"] == {"accounts_receivable": True, "accounts_payable": False}
    assert disconnected["status"] == "disconnected" and "revocation_queued" not in disconnected
    assert deleted["status"] == "disconnected"
    # No secret in any event: no token, and nothing that reads like one.
    text = json.dumps([e["data"] for e in events])
    assert "token" not in text and "secret" not in text


async def test_the_audit_trail_is_unchanged(client, linked) -> None:
    connection_id = await linked()
    answer = await client.get(f"/connections/{connection_id}/events", headers=user_headers())
    assert answer.status_code == 200
    assert [e["type"] for e in answer.json()["items"]] == ["linked", "created"]


async def test_a_rolled_back_change_emits_nothing(runtime, new_connection, stack) -> None:
    conn = await new_connection()
    listener = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    heard: list[str] = []
    await listener.add_listener(outbox.CHANNEL, lambda *args: heard.append(args[3]))
    try:
        with pytest.raises(RuntimeError):
            async with transaction(runtime.sessionmaker) as session:
                row = await repo.get_connection(session, uuid.UUID(conn["id"]), for_update=True)
                assert row is not None
                row.module_ap = True
                await repo.add_event(
                    session, row, "modules_changed", actor="user:user-1", accounts_payable=True
                )
                await session.flush()  # the event row is written, then taken back
                raise RuntimeError("the change fails after its event was written")
        async with transaction(runtime.sessionmaker) as session:
            row = await repo.get_connection(session, uuid.UUID(conn["id"]), for_update=True)
            assert row is not None
            await outbox.emit_for_connection(session, outbox.CONNECTION_MODULES_CHANGED, row)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    types = [e["type"] for e in await events_of(stack.database_url, conn["id"])]
    assert types == ["connection.created", "connection.modules_changed"]
    # Only the committed event was announced, with its seq and tenant.
    assert len(heard) == 1
    payload = json.loads(heard[0])
    assert payload["tenant_id"] == "tenant-a" and payload["connection_id"] == conn["id"]
    assert payload["type"] == "connection.modules_changed" and payload["seq"] > 0


async def test_a_refused_refresh_publishes_reauthorization_required(
    new_connection, connect, emulator, runtime, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    await emulator.post(f"/companies/{COMPANY_1}/disconnect")
    await execute(
        stack.database_url, "UPDATE connections SET keepalive_due_at = now() WHERE id=$1", conn["id"]
    )
    assert await keep_alive(runtime) == 0
    last = (await events_of(stack.database_url, conn["id"]))[-1]
    assert last["type"] == "connection.reauthorization_required"
    assert last["data"]["status"] == "reauthorization_required"
    assert last["data"]["last_error"]["code"] == "invalid_grant"
    assert last["data"]["realm_id"] == COMPANY_1
    assert last["data"]["accounting_link"] == "disabled"


async def test_pending_links_publish_created_and_expired(new_connection, connect, runtime, stack) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=DAVE, realm_id=COMPANY_1)
    result = await connect(conn["id"], email=DAVE, realm_id=COMPANY_2)
    assert result.params["result"] == "confirmation_required"
    await execute(stack.database_url, "UPDATE pending_links SET expires_at = now() - interval '1 s'")
    assert await expire_pending_links(runtime) == 1
    events = await events_of(stack.database_url, conn["id"])
    assert [e["type"] for e in events] == [
        "connection.created",
        "connection.connected",
        "connection.pending_link_created",
        "connection.pending_link_expired",
    ]
    created, expired = events[2]["data"], events[3]["data"]
    assert created["pending_link"]["reasons"] == ["different_quickbooks_company"]
    assert created["pending_link"]["realm_id"] == COMPANY_2 and created["realm_id"] == COMPANY_1
    assert expired["pending_link"]["realm_id"] == COMPANY_2 and expired["status"] == "connected"


async def test_a_declined_takeover_publishes_reauthorization_required(
    client, new_connection, connect, stack
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email="alice@example.com", realm_id=COMPANY_1)
    result = await connect(conn["id"], email=DAVE, realm_id=COMPANY_1, connect_anyway=True)
    assert result.params["result"] == "confirmation_required", result.params
    declined = await client.delete(f"/connections/{conn['id']}/pending-link", headers=user_headers())
    assert declined.status_code == 204
    events = await events_of(stack.database_url, conn["id"])
    assert [e["type"] for e in events][-2:] == [
        "connection.pending_link_declined",
        "connection.reauthorization_required",
    ]
    assert events[-1]["data"]["last_error"]["code"] == "quickbooks_connection_revoked"
    assert events[-2]["data"]["status"] == "reauthorization_required"


async def test_emit_refuses_an_unknown_type(runtime) -> None:
    async with runtime.sessionmaker() as session:
        with pytest.raises(ValueError, match="not a valid EventType"):
            await outbox.emit(session, "connection.renamed", tenant_id="t", connection_id=None, data={})


async def test_a_refused_link_is_published(new_connection, connect, stack) -> None:
    first, second = await new_connection(), await new_connection()
    await connect(first["id"], realm_id=COMPANY_1)
    refused = await connect(second["id"], realm_id=COMPANY_1)
    assert refused.params["error"] == "quickbooks_company_in_use", refused.params
    last = (await events_of(stack.database_url, second["id"]))[-1]
    assert last["type"] == "connection.link_refused"
    assert last["data"]["error"]["code"] == "quickbooks_company_in_use"
    assert last["data"]["last_error"]["code"] == "quickbooks_company_in_use"
    assert last["data"]["status"] == "pending"
