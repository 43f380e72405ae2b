"""GET /status/stream and GET /connections/{id}/stream over real HTTP: events arrive live, in
order, only to their tenant; Last-Event-ID resumes; who may open a stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from service.events.delivery import body_of
from tests.conftest import TENANT, Stack, user_headers
from tests.streams.conftest import insert_event, stream

Emit = Callable[..., Awaitable[str]]
NewConnection = Callable[..., Awaitable[dict[str, Any]]]


async def test_status_stream_carries_the_tenants_events_live_as_webhook_bodies(
    stack: Stack, emit: Emit, db: asyncpg.Connection
) -> None:
    connection_id = str(uuid.uuid4())
    async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
        assert events.response.headers["cache-control"] == "no-store"
        first = await events.next_message()
        assert first is not None and first.retry == 3000  # the reconnect delay, sent first
        event_id = await emit(
            TENANT,
            connection_id,
            "connection.modules_changed",
            {"modules": {"accounts_receivable": True, "accounts_payable": False}},
        )
        message = await events.next_event()
    assert message.id == event_id
    assert message.event == "connection.modules_changed"
    body = message.body
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "connection.modules_changed"
    assert body["data"] == {
        "tenant_id": TENANT,
        "connection_id": connection_id,
        "modules": {"accounts_receivable": True, "accounts_payable": False},
    }
    # Byte for byte what a webhook endpoint receives for it.
    row = await db.fetchrow("SELECT * FROM events WHERE id = $1", uuid.UUID(event_id))
    assert message.data == body_of(row).decode()
    assert body["timestamp"].endswith("Z")


async def test_a_stream_never_sees_another_tenants_events(stack: Stack, emit: Emit) -> None:
    async with stream(stack.broker_url, "/status/stream", user_headers()) as mine:
        await emit("tenant-b", str(uuid.uuid4()))
        own = await emit(TENANT, str(uuid.uuid4()))
        # Both were committed in this order: had the other tenant's reached this stream, it
        # would have come first.
        assert (await mine.next_event()).id == own


async def test_the_streams_carry_connection_events_only(stack: Stack, emit: Emit) -> None:
    async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
        await emit(TENANT, str(uuid.uuid4()), "quickbooks.entity_changed", {"entity": "Invoice"})
        connected = await emit(TENANT, str(uuid.uuid4()), "connection.connected")
        assert (await events.next_event()).id == connected


async def test_connection_stream_carries_that_connection_only(
    stack: Stack, emit: Emit, new_connection: NewConnection
) -> None:
    mine, other = (await new_connection())["id"], (await new_connection())["id"]
    async with stream(stack.broker_url, f"/connections/{mine}/stream", user_headers()) as events:
        await emit(TENANT, other, "connection.connected")
        expected = await emit(TENANT, mine, "connection.connected")
        message = await events.next_event()
    assert message.id == expected
    assert message.body["data"]["connection_id"] == mine


async def test_connection_stream_ends_when_the_connection_is_deleted(
    stack: Stack, emit: Emit, new_connection: NewConnection
) -> None:
    connection_id = (await new_connection())["id"]
    async with stream(stack.broker_url, f"/connections/{connection_id}/stream", user_headers()) as events:
        deleted = await emit(TENANT, connection_id, "connection.deleted")
        received = await events.events_until_end()
    assert [m.id for m in received] == [deleted]


async def test_last_event_id_resumes_after_that_event_then_goes_on_live(stack: Stack, emit: Emit) -> None:
    connection_id = str(uuid.uuid4())
    seen = [await emit(TENANT, connection_id) for _ in range(3)]
    await emit("tenant-b", connection_id)  # another tenant's, between: never replayed
    later = await emit(TENANT, connection_id)
    headers = {**user_headers(), "Last-Event-ID": seen[0]}
    async with stream(stack.broker_url, "/status/stream", headers) as events:
        assert events.response.headers["x-stream-resumed"] == "true"
        replayed = [(await events.next_event()).id for _ in range(3)]
        live = await emit(TENANT, connection_id)
        assert (await events.next_event()).id == live
    assert replayed == [seen[1], seen[2], later]


async def test_an_unknown_or_foreign_last_event_id_starts_from_now(stack: Stack, emit: Emit) -> None:
    await emit(TENANT, str(uuid.uuid4()))
    foreign = await emit("tenant-b", str(uuid.uuid4()))
    for last in (str(uuid.uuid4()), foreign, "not-an-event-id"):
        headers = {**user_headers(), "Last-Event-ID": last}
        async with stream(stack.broker_url, "/status/stream", headers) as events:
            assert events.response.headers["x-stream-resumed"] == "false"
            live = await emit(TENANT, str(uuid.uuid4()))
            assert (await events.next_event()).id == live  # nothing replayed before it


async def test_events_go_out_in_commit_independent_seq_order(stack: Stack, db: asyncpg.Connection) -> None:
    """A transaction that took its seq first but commits second is not overtaken: the later
    seq waits for it, so that resuming after the later one never skips the earlier."""
    slow = await asyncpg.connect(dsn=_dsn(stack))
    try:
        async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
            slow_tx = slow.transaction()
            await slow_tx.start()
            first = await insert_event(slow, TENANT, str(uuid.uuid4()))  # takes the lower seq
            second = await insert_event(db, TENANT, str(uuid.uuid4()))  # commits at once
            await slow_tx.commit()
            received = [(await events.next_event()).id for _ in range(2)]
    finally:
        await slow.close()
    assert received == [first, second]


async def test_a_rolled_back_event_does_not_hold_the_stream(stack: Stack, db: asyncpg.Connection) -> None:
    async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
        async with db.transaction():
            await insert_event(db, TENANT, str(uuid.uuid4()))
            await db.execute("SELECT 1")
        tx = db.transaction()
        await tx.start()
        await insert_event(db, TENANT, str(uuid.uuid4()))
        await tx.rollback()
        after = await insert_event(db, TENANT, str(uuid.uuid4()))
        received = [(await events.next_event()).id for _ in range(2)]
    assert received[1] == after


def _dsn(stack: Stack) -> str:
    from service.core.db.engine import asyncpg_dsn

    return asyncpg_dsn(stack.database_url)


# Who may open a stream.


async def test_another_tenants_connection_stream_is_not_found(
    stack: Stack, new_connection: NewConnection
) -> None:
    theirs = (await new_connection(tenant="tenant-b"))["id"]
    async with httpx.AsyncClient(base_url=stack.broker_url, timeout=10) as http:
        answer = await http.get(f"/connections/{theirs}/stream", headers=user_headers())
        unknown = await http.get(f"/connections/{uuid.uuid4()}/stream", headers=user_headers())
        foreign_tenant = await http.get(
            "/status/stream", params={"tenant_id": "tenant-b"}, headers=user_headers()
        )
    for response in (answer, unknown, foreign_tenant):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "not_found"


async def test_streams_need_credentials(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.broker_url, timeout=10) as http:
        anonymous = await http.get("/status/stream")
        forged = await http.get("/status/stream", headers={"Authorization": "Bearer not.a.jwt"})
    for response in (anonymous, forged):
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"


async def test_a_service_needs_status_read_and_names_the_tenant(
    stack: Stack,
    emit: Emit,
    service_headers: Callable[..., Awaitable[dict[str, str]]],
    new_connection: NewConnection,
) -> None:
    reader = await service_headers("status:read")
    tokens_only = await service_headers("tokens:read", name="tokens")
    connection_id = (await new_connection())["id"]
    async with httpx.AsyncClient(base_url=stack.broker_url, timeout=10) as http:
        refused = await http.get("/status/stream", params={"tenant_id": TENANT}, headers=tokens_only)
        refused_one = await http.get(f"/connections/{connection_id}/stream", headers=tokens_only)
        unnamed = await http.get("/status/stream", headers=reader)
    assert refused.status_code == refused_one.status_code == 403
    assert refused.json()["code"] == "forbidden"
    assert unnamed.status_code == 422
    async with stream(stack.broker_url, "/status/stream", reader, tenant_id=TENANT) as events:
        expected = await emit(TENANT, connection_id)
        assert (await events.next_event()).id == expected
    async with stream(stack.broker_url, f"/connections/{connection_id}/stream", reader) as events:
        expected = await emit(TENANT, connection_id)
        assert (await events.next_event()).id == expected


async def test_a_user_stream_ends_when_its_token_expires(stack: Stack) -> None:
    from service.auth.jwt import issue_dev_token
    from tests.conftest import JWT_SECRET

    token = issue_dev_token(JWT_SECRET, tenant_id=TENANT, user_id="user-1", ttl_seconds=2)
    async with stream(stack.broker_url, "/status/stream", {"Authorization": f"Bearer {token}"}) as events:
        # It ends by itself (the body is complete), for the client to come back with a new token.
        assert await events.events_until_end(seconds=15) == []


async def test_many_streams_share_one_listening_connection(
    stack: Stack, emit: Emit, db: asyncpg.Connection
) -> None:
    async def listeners() -> int:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'qbo-broker-streams'"
            )
        )

    before = await listeners()
    assert before >= 1  # this broker's (and any other's running on the test database)
    async with (
        stream(stack.broker_url, "/status/stream", user_headers()) as one,
        stream(stack.broker_url, "/status/stream", user_headers(user="user-2")) as two,
        stream(stack.broker_url, "/status/stream", user_headers(user="user-3")) as three,
    ):
        assert await listeners() == before
        expected = await emit(TENANT, str(uuid.uuid4()))
        ids = await asyncio.gather(*(s.next_event() for s in (one, two, three)))
    assert [m.id for m in ids] == [expected] * 3


async def test_events_committed_while_the_listener_is_down_still_arrive(
    stack: Stack, emit: Emit, db: asyncpg.Connection
) -> None:
    """PostgreSQL ends the listening connection (a restart, a failover): the hub listens again
    and reads what was committed meanwhile, so the open streams miss nothing."""
    async with stream(stack.broker_url, "/status/stream", user_headers()) as events:
        ended = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'qbo-broker-streams'"
        )
        assert ended >= 1
        during = await emit(TENANT, str(uuid.uuid4()))
        assert (await events.next_event(seconds=20)).id == during


async def test_a_resume_too_far_behind_starts_from_now(
    stack: Stack, emit: Emit, db: asyncpg.Connection
) -> None:
    first = await emit(TENANT, str(uuid.uuid4()))
    await db.execute(
        "INSERT INTO events (id, type, tenant_id, connection_id, data)"
        " SELECT gen_random_uuid(), 'connection.modules_changed', $1, gen_random_uuid(), '{}'"
        " FROM generate_series(1, 1001)",
        TENANT,
    )
    # Until the hub has read past those rows: a stream that starts "from now" starts at what the
    # hub has read (rows committed just before may still reach it; clients drop ids they have).
    for _ in range(50):
        async with stream(stack.broker_url, "/status/stream", user_headers()) as probe:
            marker = await emit(TENANT, str(uuid.uuid4()))
            try:
                if (await probe.next_event()).id == marker:
                    break
            except AssertionError:  # the probe overflowed on the rows: the hub is still reading
                pass
        await asyncio.sleep(0.1)
    async with stream(
        stack.broker_url, "/status/stream", {**user_headers(), "Last-Event-ID": first}
    ) as events:
        assert events.response.headers["x-stream-resumed"] == "false"
        live = await emit(TENANT, str(uuid.uuid4()))
        assert (await events.next_event()).id == live
