"""Outgoing webhooks: registration, Standard Webhooks signatures (verified with the independent
`standardwebhooks` library), retries, 410, replicas, SSRF, redelivery and secret rotation."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.core.db.engine import transaction
from service.events import outbox
from service.events.delivery import RETRY_SCHEDULE
from tests.conftest import user_headers
from tests.support.db_helpers import fetchrow

pytestmark = pytest.mark.usefixtures("stack")


@pytest.fixture
async def hooks_key(service_headers) -> dict[str, str]:
    return await service_headers("webhooks:write", name="webhooks")


async def register(http, headers, url: str, **body: Any) -> dict[str, Any]:
    answer = await http.post("/webhook-endpoints", json={"url": url, **body}, headers=headers)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


async def make_events(client, n: int, tenant: str = "tenant-a") -> list[str]:
    """n connection.created events of the tenant; their connection ids."""
    ids = []
    for _ in range(n):
        answer = await client.post("/connections", json={}, headers=user_headers(tenant))
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["id"])
    return ids


async def event_ids(database_url: str) -> dict[str, str]:
    """connection id -> id of its connection.created event."""
    import asyncpg

    from service.core.db.engine import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT id, connection_id FROM events WHERE type = 'connection.created'")
    finally:
        await conn.close()
    return {str(r["connection_id"]): str(r["id"]) for r in rows}


async def test_a_delivery_verifies_with_the_standard_library(
    local, client, hooks_key, receivers, senders, stack
) -> None:
    receiver, url = receivers()
    endpoint = await register(local, hooks_key, url)
    secret = endpoint["secret"]
    assert secret.startswith("whsec_") and endpoint["status"] == "enabled"
    (connection_id,) = await make_events(client, 1)
    sender = await senders()
    assert await sender.drain() == 1

    (got,) = receiver.received
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "connection.created"
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["data"]["tenant_id"] == "tenant-a"
    assert payload["data"]["connection_id"] == connection_id
    assert payload["data"]["status"] == "pending"
    assert got.headers["webhook-id"] == (await event_ids(stack.database_url))[connection_id]
    assert got.headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(got.body, got.headers)

    deliveries = (
        await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)
    ).json()["items"]
    assert len(deliveries) == 1
    d = deliveries[0]
    assert d["status"] == "succeeded" and d["attempts"] == 1 and d["last_status_code"] == 200
    assert d["event_type"] == "connection.created" and d["next_attempt_at"] is None
    assert d["last_duration_ms"] is not None

    # The secret is shown once: stored sealed, never listed.
    listed = (await local.get("/webhook-endpoints", headers=hooks_key)).json()["items"]
    assert "secret" not in listed[0]
    row = await fetchrow(
        stack.database_url, "SELECT secret FROM webhook_endpoints WHERE id=$1", uuid.UUID(endpoint["id"])
    )
    assert row is not None and secret not in row["secret"] and secret[6:] not in row["secret"]


async def test_filters_by_tenant_and_type(local, client, hooks_key, receivers, senders) -> None:
    mine, mine_url = receivers()
    typed, typed_url = receivers()
    await register(local, hooks_key, mine_url, tenant_id="tenant-b")
    await register(local, hooks_key, typed_url, event_types=["connection.deleted"])
    (a,) = await make_events(client, 1, tenant="tenant-a")
    await make_events(client, 1, tenant="tenant-b")
    assert (await client.delete(f"/connections/{a}", headers=user_headers())).status_code == 204
    await (await senders()).drain()
    assert [json.loads(r.body)["data"]["tenant_id"] for r in mine.received] == ["tenant-b"]
    assert [json.loads(r.body)["type"] for r in typed.received] == ["connection.deleted"]


async def test_a_receiver_down_for_a_while_gets_everything_afterwards(
    local, client, hooks_key, receivers, senders, clock, stack
) -> None:
    receiver, url = receivers(status=503)
    endpoint = await register(local, hooks_key, url)
    connections = await make_events(client, 5)
    sender = await senders()
    assert await sender.drain() == 5  # the first attempts, all refused
    assert await sender.drain() == 0  # nothing is due before the first retry
    # Down for the first four retries (5 s, 5 min, 30 min, 2 h later).
    for delay in RETRY_SCHEDULE[1:5]:
        clock.advance(delay - 1)
        assert await sender.drain() == 0
        clock.advance(1)
        assert await sender.drain() == 5
    pending = (await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)).json()[
        "items"
    ]
    assert {(d["status"], d["attempts"], d["last_status_code"]) for d in pending} == {("pending", 5, 503)}
    assert all(d["next_attempt_at"] is not None for d in pending)
    receiver.status = 200
    clock.advance(RETRY_SCHEDULE[5])
    assert await sender.drain() == 5
    created = await event_ids(stack.database_url)
    expected = {created[c] for c in connections}
    # Every attempt of an event carried its id; the last ones were taken.
    assert {r.headers["webhook-id"] for r in receiver.received} == expected
    assert len(receiver.received) == 30
    done = (await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)).json()[
        "items"
    ]
    assert {(d["status"], d["attempts"]) for d in done} == {("succeeded", 6)}


async def test_a_delivery_fails_after_the_last_attempt(
    local, client, hooks_key, receivers, senders, clock
) -> None:
    receiver, url = receivers(status=500)
    endpoint = await register(local, hooks_key, url)
    await make_events(client, 1)
    sender = await senders()
    for delay in RETRY_SCHEDULE:
        clock.advance(delay)
        assert await sender.drain() == 1
    clock.advance(10 * 24 * 3600)
    assert await sender.drain() == 0
    (d,) = (await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)).json()[
        "items"
    ]
    assert d["status"] == "failed" and d["attempts"] == len(RETRY_SCHEDULE) == 8
    assert d["next_attempt_at"] is None and d["last_status_code"] == 500
    assert len(receiver.received) == 8


async def test_410_disables_the_endpoint(local, client, hooks_key, receivers, senders) -> None:
    receiver, url = receivers(status=410)
    other, other_url = receivers()
    gone = await register(local, hooks_key, url)
    await register(local, hooks_key, other_url)
    await make_events(client, 1)
    sender = await senders()
    await sender.drain()
    listed = {e["id"]: e for e in (await local.get("/webhook-endpoints", headers=hooks_key)).json()["items"]}
    assert listed[gone["id"]]["status"] == "disabled"
    assert "410" in listed[gone["id"]]["disabled_reason"]
    await make_events(client, 2)
    await sender.drain()
    assert len(receiver.received) == 1  # nothing more to a disabled endpoint
    assert len(other.received) == 3
    (d,) = (await local.get(f"/webhook-endpoints/{gone['id']}/deliveries", headers=hooks_key)).json()["items"]
    assert d["status"] == "failed" and d["last_status_code"] == 410


async def test_two_replicas_never_send_one_delivery_twice_at_once(
    local, client, hooks_key, receivers, senders
) -> None:
    receiver, url = receivers(delay=0.02)
    await register(local, hooks_key, url)
    await make_events(client, 30)
    first, second = await senders(), await senders()
    counts = await asyncio.gather(first.drain(), second.drain(), first.drain(), second.drain())
    assert sum(counts) == 30
    assert receiver.overlaps == 0
    ids = receiver.ids()
    assert len(ids) == len(set(ids)) == 30
    # At most BROKER_WEBHOOK_CONCURRENCY_PER_ENDPOINT (3) in flight, across both replicas.
    assert receiver.max_active <= 3


async def test_urls_that_could_reach_inside_are_refused(client, hooks_key) -> None:
    refused = [
        "http://example.com/hooks",
        "https://127.0.0.1/hooks",
        "https://localhost/hooks",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hooks",
        "https://10.1.2.3/hooks",
        "https://192.168.1.1/hooks",
        "https://100.64.0.1/",
        "https://0.0.0.0/hooks",
        "https://[::ffff:127.0.0.1]/hooks",
        "https://user:pw@93.184.216.34/hooks",
        "ftp://93.184.216.34/hooks",
        "https://240.0.0.1/hooks",
        "https://93.184.216.34/" + "a" * 2100,
    ]
    for url in refused:
        answer = await client.post("/webhook-endpoints", json={"url": url}, headers=hooks_key)
        assert answer.status_code == 422, (url, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "validation_error"
        assert "127.0.0.1" not in answer.json()["detail"]
    accepted = await client.post(
        "/webhook-endpoints", json={"url": "https://93.184.216.34/hooks"}, headers=hooks_key
    )
    assert accepted.status_code == 201, accepted.text


async def test_a_private_destination_is_refused_again_at_delivery(
    local, client, hooks_key, receivers, senders, local_broker
) -> None:
    receiver, url = receivers()
    endpoint = await register(local, hooks_key, url)
    await make_events(client, 1)
    strict = local_broker[1].model_copy(update={"webhook_allow_private": False})
    assert await (await senders(strict)).drain() == 1
    assert receiver.received == []
    (d,) = (await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)).json()[
        "items"
    ]
    assert d["status"] == "pending" and d["last_status_code"] is None
    assert d["last_error"].startswith("destination refused")


async def test_only_services_with_the_scope_manage_endpoints(client, service_headers) -> None:
    as_user = await client.get("/webhook-endpoints", headers=user_headers())
    assert as_user.status_code == 403 and as_user.json()["code"] == "forbidden"
    reader = await service_headers("status:read")
    for method, path in [
        ("GET", "/webhook-endpoints"),
        ("POST", "/webhook-endpoints"),
        ("DELETE", f"/webhook-endpoints/{uuid.uuid4()}"),
        ("POST", f"/events/{uuid.uuid4()}/redeliver"),
    ]:
        answer = await client.request(
            method, path, headers=reader, json={"url": "https://93.184.216.34/"} if method == "POST" else None
        )
        assert answer.status_code == 403, (method, path, answer.text)


async def test_caps_on_endpoints_and_event_types(client, hooks_key, stack) -> None:
    too_many_types = [t.value for t in outbox.EventType] + ["connection.created"]
    answer = await client.post(
        "/webhook-endpoints",
        headers=hooks_key,
        json={"url": "https://93.184.216.34/", "event_types": too_many_types},
    )
    assert answer.status_code == 422
    unknown = await client.post(
        "/webhook-endpoints",
        headers=hooks_key,
        json={"url": "https://93.184.216.34/", "event_types": ["connection.renamed"]},
    )
    assert unknown.status_code == 422
    limit = stack.settings.webhook_max_endpoints_per_tenant
    for _ in range(limit):
        await register(client, hooks_key, "https://93.184.216.34/", tenant_id="tenant-z")
    over = await client.post(
        "/webhook-endpoints",
        headers=hooks_key,
        json={"url": "https://93.184.216.34/", "tenant_id": "tenant-z"},
    )
    assert over.status_code == 409 and over.json()["code"] == "webhook_endpoint_limit_reached"
    # Another tenant's allowance is its own.
    await register(client, hooks_key, "https://93.184.216.34/", tenant_id="tenant-y")


async def test_redeliver_sends_the_same_event_again(
    local, client, hooks_key, receivers, senders, stack
) -> None:
    receiver, url = receivers()
    other, other_url = receivers()
    endpoint = await register(local, hooks_key, url)
    second = await register(local, hooks_key, other_url)
    (connection_id,) = await make_events(client, 1)
    sender = await senders()
    await sender.drain()
    event_id = (await event_ids(stack.database_url))[connection_id]
    again = await local.post(f"/events/{event_id}/redeliver", headers=hooks_key)
    assert again.status_code == 202, again.text
    assert sorted((d["endpoint_id"], d["status"], d["event_type"]) for d in again.json()["items"]) == sorted(
        [(endpoint["id"], "pending", "connection.created"), (second["id"], "pending", "connection.created")]
    )
    assert await sender.drain() == 2
    assert receiver.ids() == [event_id, event_id] and other.ids() == [event_id, event_id]
    one = await local.post(
        f"/events/{event_id}/redeliver", headers=hooks_key, params={"endpoint_id": second["id"]}
    )
    assert [d["endpoint_id"] for d in one.json()["items"]] == [second["id"]]
    assert await sender.drain() == 1
    assert len(other.ids()) == 3 and len(receiver.ids()) == 2
    Webhook(endpoint["secret"]).verify(receiver.received[1].body, receiver.received[1].headers)
    missing = await local.post(f"/events/{uuid.uuid4()}/redeliver", headers=hooks_key)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_rotation_signs_with_both_secrets_for_a_day(
    local, client, hooks_key, receivers, senders
) -> None:
    receiver, url = receivers()
    endpoint = await register(local, hooks_key, url)
    rotated = await local.post(f"/webhook-endpoints/{endpoint['id']}/rotate-secret", headers=hooks_key)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != endpoint["secret"]
    await make_events(client, 1)
    await (await senders()).drain()
    (got,) = receiver.received
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    # A receiver that still holds the old secret verifies, as does one with the new one.
    Webhook(endpoint["secret"]).verify(got.body, got.headers)
    Webhook(new_secret).verify(got.body, got.headers)
    listed = (await local.get("/webhook-endpoints", headers=hooks_key)).json()["items"]
    assert listed[0]["previous_secret_expires_at"] == rotated.json()["previous_secret_expires_at"]


async def test_a_rolled_back_change_delivers_nothing(
    local, client, hooks_key, receivers, senders, runtime
) -> None:
    receiver, url = receivers()
    await register(local, hooks_key, url)
    with pytest.raises(RuntimeError):
        async with transaction(runtime.sessionmaker) as session:
            await outbox.emit(
                session,
                outbox.CONNECTION_CREATED,
                tenant_id="tenant-a",
                connection_id=uuid.uuid4(),
                data={"status": "pending"},
            )
            await session.flush()
            raise RuntimeError("rolled back")
    assert await (await senders()).drain() == 0
    assert receiver.received == []


async def test_delete_endpoint(local, hooks_key, receivers) -> None:
    _, url = receivers()
    endpoint = await register(local, hooks_key, url)
    assert (await local.delete(f"/webhook-endpoints/{endpoint['id']}", headers=hooks_key)).status_code == 204
    again = await local.delete(f"/webhook-endpoints/{endpoint['id']}", headers=hooks_key)
    assert again.status_code == 404
    assert (
        await local.get(f"/webhook-endpoints/{endpoint['id']}/deliveries", headers=hooks_key)
    ).status_code == 404


async def test_a_lease_left_by_a_killed_replica_is_taken_over(
    local, client, hooks_key, receivers, senders, clock, stack
) -> None:
    import asyncpg

    from service.core.db.engine import asyncpg_dsn
    from service.events import repository
    from service.events.delivery import LEASE

    receiver, url = receivers()
    await register(local, hooks_key, url)
    (connection_id,) = await make_events(client, 1)
    # A replica leases the delivery and dies before it records anything.
    pool = await asyncpg.create_pool(asyncpg_dsn(stack.database_url), min_size=1, max_size=1)
    try:
        _, rows = await repository.claim(pool, now=clock(), per_endpoint=3, limit=10, lease=LEASE)
    finally:
        await pool.close()
    assert len(rows) == 1
    survivor = await senders()
    assert await survivor.drain() == 0  # leased: not sent a second time meanwhile
    clock.advance(LEASE.total_seconds())
    assert await survivor.drain() == 1
    assert receiver.ids() == [(await event_ids(stack.database_url))[connection_id]]
