"""Connect finishes only for the browser and cieTrade user that started it, in both bindings.

The attack these tests reproduce: a cieTrade user of tenant A sends the authorization URL to the
QuickBooks admin of another company ("please reconnect QuickBooks"); that admin signs in, in a
browser of their own, and clicks Connect. Nothing of theirs may end up linked to tenant A.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.conftest import ALICE, BOB, COMPANY_1, RETURN_URL, TENANT, finish_connect, user_headers
from tests.support.db_helpers import fetchrow
from tests.support.intuit_user import sign_in_and_decide


async def _victim(emulator: httpx.AsyncClient) -> tuple[str, str]:
    """Another company and its own admin, who has nothing to do with tenant A."""
    company = await emulator.post("/companies", json={"name": "Victim Metals Inc"})
    realm = company.json()["realm_id"]
    email = "controller@victim-metals.example.com"
    created = await emulator.post(
        "/users",
        json={
            "email": email,
            "given_name": "Vic",
            "family_name": "Tim",
            "companies": {realm: "master_admin"},
        },
    )
    assert created.status_code == 201, created.text
    return realm, email


async def _authorize(client: httpx.AsyncClient, connection_id: str, **body: Any) -> httpx.Response:
    return await client.post(
        f"/connections/{connection_id}/authorize",
        json={"return_url": RETURN_URL, **body},
        headers=user_headers(),
    )


async def _nothing_held(stack: Any) -> None:
    held = await fetchrow(stack.database_url, "SELECT count(*) AS n FROM held_grants")
    queued = await fetchrow(stack.database_url, "SELECT count(*) AS n FROM pending_revocations")
    assert (held["n"], queued["n"]) == (0, 0)


async def test_ticket_mode_requires_a_return_url(client, new_connection) -> None:
    conn = await new_connection()
    response = await client.post(f"/connections/{conn['id']}/authorize", json={}, headers=user_headers())
    assert response.status_code == 400
    assert response.json()["code"] == "return_url_required"
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_callback_holds_the_grant_until_the_same_user_completes(
    client, new_connection, stack
) -> None:
    conn = await new_connection()
    started = await _authorize(client, conn["id"])
    result = await sign_in_and_decide(started.json()["authorization_url"], email=ALICE, realm_id=COMPANY_1)
    assert result.status_code == 303
    assert result.params["result"] == "completion_required"
    ticket = result.params["completion_ticket"]
    assert len(ticket) >= 43
    # Nothing is linked until the ticket is redeemed.
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "pending" and body["realm_id"] is None
    # Another user of the same tenant cannot redeem it, and that does not burn it.
    other = await client.post(
        f"/connections/{conn['id']}/complete",
        json={"completion_ticket": ticket},
        headers=user_headers(TENANT, "user-2"),
    )
    assert other.status_code == 403 and other.json()["code"] == "completion_not_allowed"
    done = await client.post(
        f"/connections/{conn['id']}/complete", json={"completion_ticket": ticket}, headers=user_headers()
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "connected" and done.json()["realm_id"] == COMPANY_1
    assert done.json()["owner"]["user_id"] == "user-1"
    replay = await client.post(
        f"/connections/{conn['id']}/complete", json={"completion_ticket": ticket}, headers=user_headers()
    )
    assert replay.status_code == 400 and replay.json()["code"] == "invalid_state"
    await _nothing_held(stack)


async def test_a_ticket_is_bound_to_its_connection(client, new_connection) -> None:
    conn, other = await new_connection(), await new_connection()
    started = await _authorize(client, conn["id"])
    result = await sign_in_and_decide(started.json()["authorization_url"], email=ALICE, realm_id=COMPANY_1)
    ticket = result.params["completion_ticket"]
    wrong = await client.post(
        f"/connections/{other['id']}/complete", json={"completion_ticket": ticket}, headers=user_headers()
    )
    assert wrong.status_code == 400 and wrong.json()["code"] == "invalid_state"
    right = await client.post(
        f"/connections/{conn['id']}/complete", json={"completion_ticket": ticket}, headers=user_headers()
    )
    assert right.status_code == 200 and right.json()["status"] == "connected"


async def test_a_service_completes_only_for_the_user_it_named(
    client, new_connection, service_headers
) -> None:
    conn = await new_connection()
    writer = await service_headers("connections:write")
    started = await client.post(
        f"/connections/{conn['id']}/authorize",
        json={"return_url": RETURN_URL, "user_id": "user-7"},
        headers=writer,
    )
    result = await sign_in_and_decide(started.json()["authorization_url"], email=ALICE, realm_id=COMPANY_1)
    ticket = result.params["completion_ticket"]
    for body in ({"completion_ticket": ticket}, {"completion_ticket": ticket, "user_id": "user-8"}):
        refused = await client.post(f"/connections/{conn['id']}/complete", json=body, headers=writer)
        assert refused.status_code == 403, refused.text
    reader = await service_headers("status:read", name="reader")
    unscoped = await client.post(
        f"/connections/{conn['id']}/complete",
        json={"completion_ticket": ticket, "user_id": "user-7"},
        headers=reader,
    )
    assert unscoped.status_code == 403 and unscoped.json()["code"] == "forbidden"
    done = await client.post(
        f"/connections/{conn['id']}/complete",
        json={"completion_ticket": ticket, "user_id": "user-7"},
        headers=writer,
    )
    assert done.status_code == 200 and done.json()["owner"]["user_id"] == "user-7"


async def test_forwarded_url_links_nothing_in_ticket_mode(
    client, new_connection, emulator, stack, runtime
) -> None:
    conn = await new_connection()  # tenant A's, started by the attacker (user-1)
    started = await _authorize(client, conn["id"])
    victim_realm, victim_email = await _victim(emulator)
    # The victim opens the forwarded URL in a browser of their own and clicks Connect.
    landed = await sign_in_and_decide(
        started.json()["authorization_url"], email=victim_email, realm_id=victim_realm
    )
    assert landed.params["result"] == "completion_required"
    ticket = landed.params["completion_ticket"]
    # The victim's browser lands on cieTrade with the victim's own session (another tenant):
    # the frontend redeems the ticket with the victim's JWT, which is refused.
    as_victim = await client.post(
        f"/connections/{conn['id']}/complete",
        json={"completion_ticket": ticket},
        headers=user_headers("tenant-victim", "victim-user"),
    )
    assert as_victim.status_code == 403
    assert as_victim.json()["code"] == "completion_not_allowed"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "pending" and body["realm_id"] is None and body["owner"] is None
    # The attacker never sees the ticket; the held grant expires and is revoked at Intuit.
    await _expire_held_grants(stack, runtime)
    assert [g for g in (await emulator.get("/grants")).json() if g["realm_id"] == victim_realm] == []
    await _nothing_held(stack)
    events = await fetchrow(
        stack.database_url,
        "SELECT count(*) AS n FROM connection_events WHERE details::text LIKE '%' || $1 || '%'",
        victim_realm,
    )
    assert events["n"] == 0


async def _expire_held_grants(stack: Any, runtime: Any) -> None:
    from service.oauth.flows import expire_held_grants
    from tests.support.db_helpers import execute

    await execute(stack.database_url, "UPDATE held_grants SET expires_at = now() - interval '1 second'")
    assert await expire_held_grants(runtime) >= 1


async def test_forwarded_url_links_nothing_in_cookie_mode(
    cookie_connect, new_connection, emulator, client, stack
) -> None:
    conn = await new_connection()
    victim_realm, victim_email = await _victim(emulator)
    before = (await emulator.get("/stats")).json()["token"].get("authorization_code", {})
    # The victim's browser does not carry the attacker's binding cookie.
    result = await cookie_connect(conn["id"], email=victim_email, realm_id=victim_realm, with_cookie=False)
    assert result.params["result"] == "error" and result.params["error"] == "invalid_state"
    after = (await emulator.get("/stats")).json()["token"].get("authorization_code", {})
    assert after == before  # refused before the code was exchanged: no grant exists
    assert [g for g in (await emulator.get("/grants")).json() if g["realm_id"] == victim_realm] == []
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "pending" and body["realm_id"] is None
    await _nothing_held(stack)


async def test_cookie_mode_links_in_the_browser_that_started(cookie_connect, new_connection, client) -> None:
    conn = await new_connection()
    result = await cookie_connect(conn["id"])
    assert result.status_code == 303
    assert result.params == {"connection_id": conn["id"], "result": "connected"}
    set_cookie = result.headers["x-authorize-set-cookie"]
    assert set_cookie.startswith(f"__Host-qbo-connect-{conn['id']}=")
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
    assert {"secure", "httponly", "path", "max-age", "samesite"} <= attributes
    assert "samesite=lax" in set_cookie.lower() and "domain" not in attributes
    # The callback clears the cookie.
    assert (
        f'__Host-qbo-connect-{conn["id"]}=""' in result.headers["set-cookie"]
        or "max-age=0" in result.headers["set-cookie"].lower()
    )
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "connected"


async def test_cookie_mode_cors_allows_credentials_only_for_allowlisted_origins(cookie_broker) -> None:
    async with httpx.AsyncClient(base_url=cookie_broker) as http:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = await http.options(
            "/connections/x/authorize", headers={"Origin": "https://app.cietrade.test", **preflight}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert allowed.headers["access-control-allow-origin"] == "https://app.cietrade.test"
        other = await http.options(
            "/connections/x/authorize", headers={"Origin": "https://evil.test", **preflight}
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers


async def test_pkce_and_nonce_go_to_intuit(client, new_connection) -> None:
    conn = await new_connection()
    started = await _authorize(client, conn["id"])
    query = parse_qs(urlsplit(started.json()["authorization_url"]).query)
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["nonce"][0]) >= 32
    # The emulator enforces PKCE like a strict server: the exchange proved the verifier.
    result = await sign_in_and_decide(started.json()["authorization_url"], email=ALICE, realm_id=COMPANY_1)
    finished = await finish_connect(client, result, user_headers())
    assert finished.params["result"] == "connected"


async def test_company_in_use_is_refused_before_the_code_is_exchanged(
    client, new_connection, connect, emulator, service_headers
) -> None:
    other_tenant = await new_connection(tenant="tenant-b", user="b-user")
    held = await connect(other_tenant["id"], tenant="tenant-b", user="b-user", email=ALICE)
    assert held.params["result"] == "connected"
    before = (await emulator.get("/stats")).json()["token"]["authorization_code"]
    conn = await new_connection()
    refused = await connect(conn["id"], email=BOB, connect_anyway=True)
    assert refused.params["result"] == "error"
    assert refused.params["error"] == "quickbooks_company_in_use"
    assert (await emulator.get("/stats")).json()["token"]["authorization_code"] == before
    # Tenant B's link was not retired at Intuit by tenant A's mistake.
    token = await client.get(
        f"/connections/{other_tenant['id']}/token",
        params={"force_refresh": "true"},
        headers=await service_headers("tokens:read"),
    )
    assert token.status_code == 200, token.text


async def test_intuit_error_parameter_is_not_echoed(client, new_connection, stack) -> None:
    conn = await new_connection()
    started = await _authorize(client, conn["id"])
    state = parse_qs(urlsplit(started.json()["authorization_url"]).query)["state"][0]
    async with httpx.AsyncClient(base_url=stack.broker_url) as browser:
        back = await browser.get(
            "/callback", params={"state": state, "error": "<script>alert(1)</script>please_call_evil.test"}
        )
    location = back.headers["location"]
    assert "script" not in location and "evil" not in location
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["last_error"]["code"] == "authorization_code_rejected"
    assert "script" not in body["last_error"]["message"]
    assert "evil" not in body["last_error"]["message"]
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    assert "evil" not in str(events)


async def test_return_url_with_userinfo_is_refused_and_the_stored_one_is_normalised(
    client, new_connection, stack
) -> None:
    conn = await new_connection()
    for bad in (
        "https://user:pw@app.cietrade.test/x",
        "https://app.cietrade.test@evil.test/",
        "https://user@app.cietrade.test/",
    ):
        response = await client.post(
            f"/connections/{conn['id']}/authorize", json={"return_url": bad}, headers=user_headers()
        )
        assert response.status_code in (400, 422), bad
        if response.status_code == 400:
            assert response.json()["code"] == "return_url_not_allowed"
    ok = await client.post(
        f"/connections/{conn['id']}/authorize",
        json={"return_url": "HTTPS://App.CieTrade.test:443/integrations?x=1"},
        headers=user_headers(),
    )
    assert ok.status_code == 200, ok.text
    stored = await fetchrow(
        stack.database_url, "SELECT return_url FROM authorization_states WHERE connection_id = $1", conn["id"]
    )
    assert stored["return_url"] == "https://app.cietrade.test/integrations?x=1"
