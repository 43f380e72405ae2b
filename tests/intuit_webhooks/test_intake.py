"""POST /intuit/webhooks over real HTTP, on a real PostgreSQL: signatures (and rotation), both
payload formats landing as one `quickbooks.entity_changed`, duplicates and replays dropped,
companies the broker does not hold counted and dropped, oversized bodies refused, work left by
and the whole path from the emulator's Accounting API to an event.

The broker under test here runs the processor (background work on, long interval: NOTIFY wakes
it); the suite's shared broker runs without verifier tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from service.core.db.engine import asyncpg_dsn
from service.main import create_app
from tests.conftest import COMPANY_1, Stack, broker_settings
from tests.support.db_helpers import fetchrow
from tests.support.servers import ThreadedServer, free_port
from tests.support.waiting import until

NEW_TOKEN, OLD_TOKEN = "verifier-token-new", "verifier-token-old"
RETIRED_TOKEN = "verifier-token-retired"  # rotated out before this broker started
UNKNOWN_REALM = "1234567890123"
MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def webhook_broker(stack: Stack) -> Iterator[str]:
    port = free_port()
    settings = broker_settings(
        stack.database_url,
        port,
        stack.emulator_url,
        INTUIT_WEBHOOK_VERIFIER_TOKENS=f"{NEW_TOKEN}, {OLD_TOKEN}",
        BROKER_BACKGROUND_ENABLED=True,
        BROKER_BACKGROUND_INTERVAL=3600,
    )
    server = ThreadedServer(create_app(settings), port).start()
    yield server.url
    server.stop()


@pytest.fixture
async def intuit(webhook_broker: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=webhook_broker, timeout=30) as http:
        yield http


def sign(token: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(token.encode(), body, hashlib.sha256).digest()).decode()


async def post(
    http: httpx.AsyncClient, body: bytes, token: str | None = NEW_TOKEN, **headers: str
) -> httpx.Response:
    if token is not None:
        headers.setdefault("intuit-signature", sign(token, body))
    return await http.post(
        "/intuit/webhooks", content=body, headers={"content-type": "application/json", **headers}
    )


def legacy(realm: str, *entities: tuple[str, str, str, str]) -> bytes:
    return json.dumps(
        {
            "eventNotifications": [
                {
                    "realmId": realm,
                    "dataChangeEvent": {
                        "entities": [
                            {"name": name, "id": entity_id, "operation": operation, "lastUpdated": when}
                            for name, entity_id, operation, when in entities
                        ]
                    },
                }
            ]
        }
    ).encode()


def cloudevents(realm: str, *events: tuple[str, str, str, str]) -> bytes:
    return json.dumps(
        [
            {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": "intuit.dsnBgbseACLLRZNxo2dfc4evmEJdxde58xeeYcZliOU=",
                "type": kind,
                "datacontenttype": "application/json",
                "time": when,
                "intuitentityid": entity_id,
                "intuitaccountid": realm,
                "data": {},
            }
            for kind, entity_id, when, _ in events
        ]
    ).encode()


def recently(seconds: int = 60, *, fraction: str = ".657") -> tuple[str, str]:
    """One instant as the legacy format stamps it (milliseconds) and as CloudEvents do
    (nanoseconds)."""
    moment = (datetime.now(UTC) - timedelta(seconds=seconds)).replace(microsecond=0)
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}{fraction}Z", f"{base}{fraction}000123Z"


async def entity_events(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "SELECT tenant_id, connection_id, data FROM events "
            "WHERE type = 'quickbooks.entity_changed' ORDER BY seq"
        )
    finally:
        await conn.close()
    return [
        {"tenant_id": r["tenant_id"], "connection_id": str(r["connection_id"]), "data": json.loads(r["data"])}
        for r in rows
    ]


async def unprocessed(database_url: str) -> int:
    row = await fetchrow(
        database_url, "SELECT count(*) AS n FROM intuit_notifications WHERE processed_at IS NULL"
    )
    assert row is not None
    return int(row["n"])


async def stored(database_url: str) -> int:
    row = await fetchrow(database_url, "SELECT count(*) AS n FROM intuit_notifications")
    assert row is not None
    return int(row["n"])


async def all_processed(database_url: str, count: int) -> None:
    async def done() -> bool:
        return await stored(database_url) >= count and await unprocessed(database_url) == 0

    await until(done, f"{count} notifications processed")


async def counter(http: httpx.AsyncClient, outcome: str) -> float:
    text = (await http.get("/metrics")).text
    pattern = rf'^qbo_broker_intuit_entity_changes_total\{{outcome="{outcome}"\}} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


Linked = Callable[..., Awaitable[str]]


# -- signatures ---------------------------------------------------------------------------------


async def test_a_signed_notification_is_answered_and_becomes_an_event(
    intuit: httpx.AsyncClient, stack: Stack, linked: Linked
) -> None:
    connection_id = await linked()
    when, _ = recently()
    response = await post(intuit, legacy(COMPANY_1, ("Invoice", "130", "Create", when)))
    assert response.status_code == 200 and response.json() == {"status": "accepted"}
    await until(lambda: _has_events(stack.database_url, 1), "the event")
    [event] = await entity_events(stack.database_url)
    assert event == {
        "tenant_id": "tenant-a",
        "connection_id": connection_id,
        "data": {
            "realm_id": COMPANY_1,
            "entity": "Invoice",
            "entity_id": "130",
            "operation": "Create",
            "occurred_at": when.replace(".657Z", ".657000Z"),
        },
    }


async def test_both_tokens_verify_during_a_rotation(intuit: httpx.AsyncClient, stack: Stack) -> None:
    when, _ = recently()
    for index, token in enumerate((NEW_TOKEN, OLD_TOKEN)):
        body = legacy(UNKNOWN_REALM, ("Customer", str(index), "Update", when))
        assert (await post(intuit, body, token)).status_code == 200
    assert await stored(stack.database_url) == 2


async def test_forged_missing_and_retired_signatures_are_refused(
    intuit: httpx.AsyncClient, stack: Stack
) -> None:
    when, _ = recently()
    body = legacy(COMPANY_1, ("Invoice", "130", "Create", when))
    other = legacy(COMPANY_1, ("Invoice", "131", "Create", when))
    attempts = {
        "retired token": {"intuit-signature": sign(RETIRED_TOKEN, body)},
        "another body's signature": {"intuit-signature": sign(NEW_TOKEN, other)},
        "not base64": {"intuit-signature": "not base64!"},
        "a digest of nothing": {"intuit-signature": base64.b64encode(b"\0" * 32).decode()},
        "the token itself": {"intuit-signature": NEW_TOKEN},
    }
    for what, headers in attempts.items():
        response = await post(intuit, body, None, **headers)
        assert response.status_code == 401, what
        assert_problem(response, 401, "invalid_signature")
    assert_problem(await post(intuit, body, None), 401, "invalid_signature")
    assert await stored(stack.database_url) == 0


async def test_without_verifier_tokens_nothing_is_accepted(stack: Stack) -> None:
    port = free_port()
    settings = broker_settings(
        stack.database_url, port, stack.emulator_url, INTUIT_WEBHOOK_VERIFIER_TOKENS=" , "
    )
    assert settings.intuit_webhook_verifier_tokens == []
    server = ThreadedServer(create_app(settings), port).start()
    when, _ = recently()
    body = legacy(COMPANY_1, ("Invoice", "130", "Create", when))
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for headers in (
                {"intuit-signature": sign(NEW_TOKEN, body)},
                {"intuit-signature": sign("", body)},
                {},
            ):
                response = await http.post("/intuit/webhooks", content=body, headers=headers)
                assert_problem(response, 503, "intuit_webhooks_not_configured")
                assert response.headers["retry-after"]
    finally:
        server.stop()
    assert await stored(stack.database_url) == 0


# -- formats and duplicates ---------------------------------------------------------------------


@pytest.mark.parametrize("first", ["legacy", "cloudevents"])
async def test_legacy_and_cloudevents_land_as_the_same_event(
    first: str, intuit: httpx.AsyncClient, stack: Stack, linked: Linked
) -> None:
    await linked()
    legacy_when, cloud_when = recently()
    as_legacy = legacy(COMPANY_1, ("Invoice", "130", "Void", legacy_when))
    as_cloudevents = cloudevents(COMPANY_1, ("qbo.invoice.voided.v1", "130", cloud_when, ""))
    bodies = [as_legacy, as_cloudevents] if first == "legacy" else [as_cloudevents, as_legacy]
    for body in bodies:
        assert (await post(intuit, body)).status_code == 200
    await all_processed(stack.database_url, 2)
    events = await entity_events(stack.database_url)
    assert [e["data"] for e in events] == [
        {
            "realm_id": COMPANY_1,
            "entity": "Invoice",
            "entity_id": "130",
            "operation": "Void",
            "occurred_at": (legacy_when if first == "legacy" else cloud_when)
            .replace(".657Z", ".657000Z")
            .replace(".657000123Z", ".657000Z"),
        }
    ]


async def test_each_format_alone_gives_the_same_event(
    intuit: httpx.AsyncClient, stack: Stack, linked: Linked
) -> None:
    await linked()
    legacy_when, _ = recently(120)
    _, cloud_when = recently(60)
    assert (await post(intuit, legacy(COMPANY_1, ("Customer", "7", "Merge", legacy_when)))).status_code == 200
    assert (
        await post(intuit, cloudevents(COMPANY_1, ("qbo.customer.merged.v1", "7", cloud_when, "")))
    ).status_code == 200
    await all_processed(stack.database_url, 2)
    events = await entity_events(stack.database_url)
    assert [(e["data"]["entity"], e["data"]["operation"], e["data"]["entity_id"]) for e in events] == [
        ("Customer", "Merge", "7")
    ] * 2
    assert {frozenset(e["data"]) for e in events} == {
        frozenset({"realm_id", "entity", "entity_id", "operation", "occurred_at"})
    }


async def test_retries_and_replays_are_dropped(
    intuit: httpx.AsyncClient, stack: Stack, linked: Linked
) -> None:
    await linked()
    before = await counter(intuit, "duplicate")
    when, _ = recently()
    body = legacy(COMPANY_1, ("Invoice", "130", "Update", when), ("Invoice", "130", "Update", when))
    for _ in range(3):  # Intuit's retries, or an attacker replaying a captured notification
        assert (await post(intuit, body)).status_code == 200
    await all_processed(stack.database_url, 3)
    assert len(await entity_events(stack.database_url)) == 1
    assert await counter(intuit, "duplicate") - before == 5
    old, _ = recently(8 * 24 * 3600)  # older than the dedupe window: dropped as stale
    assert (await post(intuit, legacy(COMPANY_1, ("Invoice", "99", "Update", old)))).status_code == 200
    await all_processed(stack.database_url, 4)
    assert len(await entity_events(stack.database_url)) == 1


async def test_a_company_the_broker_does_not_hold_is_counted_and_dropped(
    intuit: httpx.AsyncClient, stack: Stack
) -> None:
    before = await counter(intuit, "unknown_realm")
    when, cloud_when = recently()
    assert (await post(intuit, legacy(UNKNOWN_REALM, ("Invoice", "1", "Create", when)))).status_code == 200
    assert (
        await post(intuit, cloudevents(UNKNOWN_REALM, ("qbo.bill.created.v1", "2", cloud_when, "")))
    ).status_code == 200
    await all_processed(stack.database_url, 2)
    assert await entity_events(stack.database_url) == []
    assert await counter(intuit, "unknown_realm") - before == 2


async def test_unreadable_parts_are_counted_and_the_rest_is_processed(
    intuit: httpx.AsyncClient, stack: Stack, linked: Linked
) -> None:
    await linked()
    before = {o: await counter(intuit, o) for o in ("unplaced", "malformed", "unreadable")}
    when, cloud_when = recently()
    no_company = json.loads(cloudevents(COMPANY_1, ("qbo.invoice.created.v1", "5", cloud_when, "")))
    del no_company[0]["intuitaccountid"]
    good = json.loads(cloudevents(COMPANY_1, ("qbo.invoice.created.v1", "6", cloud_when, "")))
    no_time = {**good[0], "time": "yesterday", "intuitentityid": "7"}
    for body in (json.dumps(no_company + good + [no_time]).encode(), b"{not json"):
        assert (await post(intuit, body)).status_code == 200
    await all_processed(stack.database_url, 2)
    assert [e["data"]["entity_id"] for e in await entity_events(stack.database_url)] == ["6"]
    assert {o: await counter(intuit, o) - before[o] for o in before} == {
        "unplaced": 1,
        "malformed": 1,
        "unreadable": 1,
    }


# -- size ---------------------------------------------------------------------------------------


async def test_bodies_over_two_megabytes_are_refused(intuit: httpx.AsyncClient, stack: Stack) -> None:
    when, _ = recently()
    notification = legacy(UNKNOWN_REALM, ("Invoice", "1", "Create", when))
    at_limit = notification[:-1] + b" " * (MAX_BODY - len(notification)) + b"}"
    assert len(at_limit) == MAX_BODY
    assert (await post(intuit, at_limit)).status_code == 200
    over = at_limit[:-1] + b" }"
    assert_problem(await post(intuit, over), 413, "payload_too_large")

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    response = await intuit.post(
        "/intuit/webhooks", content=streamed(), headers={"intuit-signature": sign(NEW_TOKEN, b"")}
    )
    assert_problem(response, 413, "payload_too_large")
    assert await stored(stack.database_url) == 1


# -- end to end ---------------------------------------------------------------------------------


async def test_an_invoice_made_in_quickbooks_becomes_an_event(
    intuit: httpx.AsyncClient,
    webhook_broker: str,
    client: httpx.AsyncClient,
    emulator: httpx.AsyncClient,
    stack: Stack,
    linked: Linked,
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> None:
    connection_id = await linked()
    configured = await emulator.post(
        "/webhooks",
        json={
            "url": f"{webhook_broker}/intuit/webhooks",
            "verifier_token": OLD_TOKEN,
            "format": "both",
            "batch_window_s": 0.1,
            "duplicate_probability": 1,
        },
    )
    assert configured.status_code == 200, configured.text
    token = await client.get(
        f"/connections/{connection_id}/token", headers=await service_headers("tokens:read")
    )
    assert token.status_code == 200, token.text
    created = await httpx.AsyncClient(base_url=stack.emulator_url).post(
        f"/v3/company/{COMPANY_1}/invoice",
        params={"minorversion": "75"},
        headers={"Authorization": f"Bearer {token.json()['access_token']}", "Accept": "application/json"},
        json={
            "CustomerRef": {"value": "1"},
            "Line": [
                {
                    "Amount": 150,
                    "DetailType": "SalesItemLineDetail",
                    "SalesItemLineDetail": {"ItemRef": {"value": "2"}, "Qty": 2, "UnitPrice": 75},
                }
            ],
        },
    )
    assert created.status_code == 200, created.text
    invoice_id = created.json()["Invoice"]["Id"]

    async def delivered() -> bool:
        deliveries = (await emulator.get("/webhooks/deliveries")).json()
        return [d.get("status") for d in deliveries] == [200] * 4

    await until(delivered, "both formats, each sent twice")
    await all_processed(stack.database_url, 4)
    events = await entity_events(stack.database_url)
    assert [
        (e["connection_id"], e["data"]["entity"], e["data"]["entity_id"], e["data"]["operation"])
        for e in events
    ] == [(connection_id, "Invoice", invoice_id, "Create")]


async def _has_events(database_url: str, count: int) -> bool:
    return len(await entity_events(database_url)) >= count
