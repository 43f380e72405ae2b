"""GET /connections/{id}/token: fresh tokens for services, refresh rules, failure handling."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import user_headers
from tests.support.db_helpers import expire_access_token, fetchrow


async def _refreshes(emulator: httpx.AsyncClient) -> int:
    stats = (await emulator.get("/stats")).json()
    return int(stats["token"].get("refresh_token", {}).get("ok", 0))


async def test_fresh_token_is_served_without_calling_intuit(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    before = await _refreshes(emulator)
    response = await client.get(f"/connections/{cid}/token", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_at", "realm_id", "api_base_url"}
    assert body["token_type"] == "bearer"
    assert body["api_base_url"] == stack.emulator_url
    assert response.headers["cache-control"] == "no-store"
    assert await _refreshes(emulator) == before
    # The token is real: Intuit's CompanyInfo accepts it.
    async with httpx.AsyncClient() as http:
        info = await http.get(
            f"{body['api_base_url']}/v3/company/{body['realm_id']}/companyinfo/{body['realm_id']}",
            params={"minorversion": "75"},
            headers={"Authorization": f"Bearer {body['access_token']}", "Accept": "application/json"},
        )
    assert info.status_code == 200


async def test_token_endpoint_is_for_services_with_tokens_read(client, linked, service_headers) -> None:
    cid = await linked()
    as_user = await client.get(f"/connections/{cid}/token", headers=user_headers())
    assert as_user.status_code == 403 and as_user.json()["code"] == "forbidden"
    wrong_scope = await client.get(f"/connections/{cid}/token", headers=await service_headers("status:read"))
    assert wrong_scope.status_code == 403
    nobody = await client.get(f"/connections/{cid}/token")
    assert nobody.status_code == 401 and nobody.json()["code"] == "unauthorized"
    forged = await client.get(f"/connections/{cid}/token", headers={"X-API-Key": "qbk_x_y"})
    assert forged.status_code == 401


async def test_nearly_expired_token_is_refreshed_and_rotation_persisted(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    first = (await client.get(f"/connections/{cid}/token", headers=headers)).json()
    before_row = await fetchrow(stack.database_url, "SELECT refresh_token FROM connections WHERE id=$1", cid)
    await expire_access_token(stack.database_url, cid, seconds_left=200)  # < 5 minutes
    second = (await client.get(f"/connections/{cid}/token", headers=headers)).json()
    assert second["access_token"] != first["access_token"]
    assert await _refreshes(emulator) == 1
    after_row = await fetchrow(stack.database_url, "SELECT refresh_token FROM connections WHERE id=$1", cid)
    assert after_row["refresh_token"] != before_row["refresh_token"]  # the rotated one is stored
    # And it works: a forced refresh succeeds with the stored (rotated) refresh token.
    forced = await client.get(f"/connections/{cid}/token", params={"force_refresh": "true"}, headers=headers)
    assert forced.status_code == 200
    assert forced.json()["access_token"] not in (first["access_token"], second["access_token"])
    assert await _refreshes(emulator) == 2
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert [e["type"] for e in events["items"][:2]] == ["refreshed", "refreshed"]


async def test_concurrent_requests_share_one_refresh(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    await emulator.post("/config", json={"latency_ms": 200})
    await expire_access_token(stack.database_url, cid, seconds_left=10)
    responses = await asyncio.gather(
        *(client.get(f"/connections/{cid}/token", headers=headers) for _ in range(30))
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["access_token"] for r in responses}) == 1
    stats = (await emulator.get("/stats")).json()
    assert stats["token"].get("refresh_token", {}).get("ok") == 1
    assert stats["token"].get("refresh_token", {}).get("invalid_grant", 0) == 0


async def test_disconnected_in_quickbooks_becomes_reauthorization_required(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    realm = (await client.get(f"/connections/{cid}", headers=user_headers())).json()["realm_id"]
    stored = await fetchrow(
        stack.database_url, "SELECT access_token, refresh_token FROM connections WHERE id=$1", cid
    )
    await emulator.post(f"/companies/{realm}/disconnect")
    await expire_access_token(stack.database_url, cid)
    response = await client.get(f"/connections/{cid}/token", headers=headers)
    assert response.status_code == 409
    problem = response.json()
    assert problem["code"] == "reauthorization_required" and problem["status"] == 409
    assert problem["connection_id"] == cid
    assert problem["connection_status"] == "reauthorization_required"
    body = (await client.get(f"/connections/{cid}", headers=user_headers())).json()
    assert body["status"] == "reauthorization_required"
    assert body["last_error"]["code"] == "invalid_grant"
    # Stored credentials are untouched by a refused refresh.
    after = await fetchrow(
        stack.database_url, "SELECT access_token, refresh_token FROM connections WHERE id=$1", cid
    )
    assert dict(after) == dict(stored)
    again = await client.get(f"/connections/{cid}/token", headers=headers)
    assert again.json()["code"] == "reauthorization_required"
    stats = (await emulator.get("/stats")).json()
    assert stats["token"].get("refresh_token", {}).get("invalid_grant") == 1  # asked once, not again
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert events["items"][0]["type"] == "refresh_failed"
    # Intuit's transaction id of the refusal, for support (never a secret).
    assert events["items"][0]["details"]["intuit_tid"]
    status = (await client.get("/status", headers=user_headers())).json()
    assert status["accounting_link"] == "disabled"


async def test_intuit_outage_is_503_with_retry_after_and_changes_nothing(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    await expire_access_token(stack.database_url, cid)
    stored = await fetchrow(stack.database_url, "SELECT * FROM connections WHERE id=$1", cid)
    await emulator.post("/faults", json={"endpoint": "token", "kind": "status", "status": 503, "count": 10})
    response = await client.get(f"/connections/{cid}/token", headers=headers)
    assert response.status_code == 503
    assert response.json()["code"] == "intuit_unavailable"
    assert int(response.headers["retry-after"]) > 0
    after = await fetchrow(stack.database_url, "SELECT * FROM connections WHERE id=$1", cid)
    assert dict(after) == dict(stored)
    stats = (await emulator.get("/stats")).json()
    assert sum(stats["faults_fired"].values()) == stack.settings.intuit_max_attempts  # bounded retries
    await emulator.delete("/faults")
    recovered = await client.get(f"/connections/{cid}/token", headers=headers)
    assert recovered.status_code == 200


async def test_token_for_pending_or_disconnected_is_not_connected(
    client, new_connection, linked, service_headers
) -> None:
    headers = await service_headers("tokens:read")
    pending = await new_connection()
    response = await client.get(f"/connections/{pending['id']}/token", headers=headers)
    assert response.status_code == 409 and response.json()["code"] == "not_connected"
    cid = await linked()
    await client.post(f"/connections/{cid}/disconnect", headers=user_headers())
    response = await client.get(f"/connections/{cid}/token", headers=headers)
    assert response.json()["code"] == "not_connected"
