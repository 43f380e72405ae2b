"""Connections over HTTP: create, list, get, modules, delete; tenant isolation; link status."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import ALICE, COMPANY_1, RETURN_URL, TENANT, user_headers


async def test_create_starts_pending_with_modules_off(client: httpx.AsyncClient) -> None:
    response = await client.post("/connections", json={}, headers=user_headers())
    assert response.status_code == 201
    body = response.json()
    assert body["tenant_id"] == TENANT
    assert body["status"] == "pending"
    assert body["modules"] == {"accounts_receivable": False, "accounts_payable": False}
    assert body["accounting_link"] == "disabled"
    assert body["owner"] is None and body["pending_link"] is None and body["realm_id"] is None
    uuid.UUID(body["id"])


async def test_create_without_body_works_for_users(client: httpx.AsyncClient) -> None:
    response = await client.post("/connections", headers=user_headers())
    assert response.status_code == 201


async def test_user_cannot_create_for_another_tenant(client: httpx.AsyncClient) -> None:
    response = await client.post("/connections", json={"tenant_id": "tenant-b"}, headers=user_headers())
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


async def test_another_tenants_connection_is_not_found_everywhere(client, new_connection, connect) -> None:
    conn = await new_connection(tenant="tenant-b", user="b-user")
    await connect(conn["id"], tenant="tenant-b", user="b-user")
    intruder = user_headers("tenant-a", "user-1")
    cid = conn["id"]
    for method, path, body in [
        ("GET", f"/connections/{cid}", None),
        ("PATCH", f"/connections/{cid}", {"modules": {"accounts_receivable": True}}),
        ("POST", f"/connections/{cid}/authorize", {"return_url": RETURN_URL}),
        ("POST", f"/connections/{cid}/complete", {"completion_ticket": "x"}),
        ("POST", f"/connections/{cid}/disconnect", None),
        ("POST", f"/connections/{cid}/pending-link/confirm", None),
        ("DELETE", f"/connections/{cid}/pending-link", None),
        ("GET", f"/connections/{cid}/events", None),
        ("DELETE", f"/connections/{cid}", None),
    ]:
        response = await client.request(method, path, json=body, headers=intruder)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["code"] == "not_found"
    listed = (await client.get("/connections", headers=intruder)).json()
    assert listed["items"] == []
    status = (await client.get("/status", headers=intruder)).json()
    assert status["connections"] == []
    assert (
        await client.get("/status", params={"tenant_id": "tenant-b"}, headers=intruder)
    ).status_code == 404
    still = await client.get(f"/connections/{cid}", headers=user_headers("tenant-b", "b-user"))
    assert still.json()["status"] == "connected"


async def test_list_paginates_newest_first_and_filters(client, new_connection, connect) -> None:
    made = [await new_connection() for _ in range(5)]
    await connect(made[0]["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/connections", params=params, headers=user_headers())).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [c["id"] for c in reversed(made)]
    connected = (
        await client.get("/connections", params={"status": "connected"}, headers=user_headers())
    ).json()
    assert [c["id"] for c in connected["items"]] == [made[0]["id"]]


async def test_bad_cursor_and_limit_are_validation_errors(client) -> None:
    for params in ({"cursor": "not-a-cursor"}, {"limit": 0}, {"limit": 101}, {"status": "sleeping"}):
        response = await client.get("/connections", params=params, headers=user_headers())
        assert response.status_code == 422, params
        assert response.json()["code"] == "validation_error"
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_patch_modules_keeps_omitted_keys_and_enables_the_link(client, new_connection, connect) -> None:
    conn = await new_connection()
    url = f"/connections/{conn['id']}"
    on = await client.patch(url, json={"modules": {"accounts_receivable": True}}, headers=user_headers())
    assert on.json()["modules"] == {"accounts_receivable": True, "accounts_payable": False}
    assert on.json()["accounting_link"] == "disabled"  # not connected yet
    await connect(conn["id"], email=ALICE, realm_id=COMPANY_1)
    both = await client.patch(url, json={"modules": {"accounts_payable": True}}, headers=user_headers())
    assert both.json()["modules"] == {"accounts_receivable": True, "accounts_payable": True}
    assert both.json()["accounting_link"] == "enabled"
    status = (await client.get("/status", headers=user_headers())).json()
    assert status["accounting_link"] == "enabled"
    assert status["connections"][0]["modules"]["accounts_payable"] is True
    off = await client.patch(
        url,
        json={"modules": {"accounts_receivable": False, "accounts_payable": False}},
        headers=user_headers(),
    )
    assert off.json()["accounting_link"] == "disabled"


@pytest.mark.parametrize(
    "body",
    [
        {"modules": {"accounts_receivable": "yes"}},
        {"modules": {}},
        {"modules": {"payroll": True}},
        {},
        [],
        "text",
    ],
)
async def test_patch_rejects_bad_bodies(client, new_connection, body) -> None:
    conn = await new_connection()
    response = await client.patch(f"/connections/{conn['id']}", json=body, headers=user_headers())
    if body == {"modules": {}}:
        assert response.status_code == 200  # nothing to change is fine
        return
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


async def test_malformed_json_is_a_validation_error(client, new_connection) -> None:
    conn = await new_connection()
    response = await client.patch(
        f"/connections/{conn['id']}",
        content=b"{not json",
        headers={**user_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


async def test_oversized_body_is_refused(client, new_connection) -> None:
    conn = await new_connection()
    big = b'{"modules": {"accounts_receivable": true}, "pad": "' + b"x" * 200_000 + b'"}'
    response = await client.patch(
        f"/connections/{conn['id']}",
        content=big,
        headers={**user_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"

    async def chunks():
        yield b'{"modules": {"accounts_receivable": true}, "pad": "'
        for _ in range(20):
            yield b"x" * 10_000
        yield b'"}'

    streamed = await client.patch(
        f"/connections/{conn['id']}",
        content=chunks(),
        headers={**user_headers(), "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413


async def test_unknown_id_and_bad_uuid(client) -> None:
    missing = await client.get(f"/connections/{uuid.uuid4()}", headers=user_headers())
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    bad = await client.get("/connections/not-a-uuid", headers=user_headers())
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


async def test_delete_disconnects_then_removes(client, new_connection, connect, emulator) -> None:
    conn = await new_connection()
    await connect(conn["id"])
    assert (await emulator.get("/grants")).json()
    response = await client.delete(f"/connections/{conn['id']}", headers=user_headers())
    assert response.status_code == 204
    assert (await emulator.get("/grants")).json() == []
    gone = await client.get(f"/connections/{conn['id']}", headers=user_headers())
    assert gone.status_code == 404


async def test_status_lists_every_connection_of_the_tenant(
    client, new_connection, connect, service_headers
) -> None:
    a, b = await new_connection(), await new_connection()
    await connect(a["id"])
    await client.patch(
        f"/connections/{a['id']}", json={"modules": {"accounts_receivable": True}}, headers=user_headers()
    )
    status = (await client.get("/status", headers=user_headers())).json()
    assert status["tenant_id"] == TENANT
    assert status["accounting_link"] == "enabled"
    by_id = {c["id"]: c for c in status["connections"]}
    assert by_id[a["id"]]["accounting_link"] == "enabled"
    assert by_id[b["id"]]["status"] == "pending"
    assert by_id[a["id"]]["owner"]["quickbooks_user"]["email"] == ALICE
    reader = await service_headers("status:read")
    as_service = await client.get("/status", params={"tenant_id": TENANT}, headers=reader)
    assert as_service.status_code == 200
    assert as_service.json()["accounting_link"] == "enabled"
    missing_tenant = await client.get("/status", headers=reader)
    assert missing_tenant.status_code == 422
