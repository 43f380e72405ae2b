"""The Connect flow end to end: broker ⇄ Intuit emulator over HTTP, real PostgreSQL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx

from tests.conftest import ALICE, BOB, CAROL, COMPANY_1, COMPANY_2, DAVE, RETURN_URL, user_headers


async def test_authorize_url_points_at_intuit_with_state_and_registered_redirect(
    client: httpx.AsyncClient, new_connection, stack
) -> None:
    conn = await new_connection()
    response = await client.post(
        f"/connections/{conn['id']}/authorize", json={"return_url": RETURN_URL}, headers=user_headers()
    )
    assert response.status_code == 200
    url = urlsplit(response.json()["authorization_url"])
    query = parse_qs(url.query)
    assert f"{url.scheme}://{url.netloc}" == stack.emulator_url
    assert url.path == "/connect/oauth2"
    assert query["redirect_uri"] == [f"{stack.settings.public_url}/callback"]
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["test-client-id"]
    assert set(query["scope"][0].split()) == {
        "com.intuit.quickbooks.accounting",
        "openid",
        "email",
        "profile",
    }
    assert len(query["state"][0]) >= 43  # 256 bits, base64url


async def test_first_connect_links_the_connection(client, new_connection, connect) -> None:
    conn = await new_connection()
    result = await connect(conn["id"], email=ALICE, realm_id=COMPANY_1)
    assert result.status_code == 303
    assert result.location.startswith(RETURN_URL + "?")
    assert result.params == {"connection_id": conn["id"], "result": "connected"}
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "connected"
    assert body["realm_id"] == COMPANY_1
    assert body["company_name"] == "Sandbox Company_US_1"
    assert body["owner"]["user_id"] == "user-1"
    assert body["owner"]["quickbooks_user"]["email"] == ALICE
    assert body["owner"]["quickbooks_user"]["name"] == "Alice Admin"
    assert body["access_token_expires_at"] and body["refresh_token_expires_at"]
    assert body["accounting_link"] == "disabled"  # no module yet
    assert body["last_error"] is None


async def test_callback_answers_carry_no_secrets_and_strict_headers(client, new_connection, connect) -> None:
    conn = await new_connection()
    result = await connect(conn["id"])
    callback = parse_qs(urlsplit(result.callback_url).query)
    assert "code" in callback and "state" in callback
    for secret in (callback["code"][0], callback["state"][0]):
        assert secret not in result.location
    assert set(result.callback_params) == {"connection_id", "result", "completion_ticket"}
    assert result.callback_params["result"] == "completion_required"
    assert result.headers["referrer-policy"] == "no-referrer"


async def test_state_is_single_use(client, new_connection, connect) -> None:
    conn = await new_connection()
    result = await connect(conn["id"])
    async with httpx.AsyncClient() as browser:
        replay = await browser.get(result.callback_url)
    assert replay.status_code == 303
    params = parse_qs(urlsplit(replay.headers["location"]).query)
    assert params["result"] == ["error"] and params["error"] == ["invalid_state"]
    assert replay.headers["referrer-policy"] == "no-referrer"
    assert replay.headers["cache-control"] == "no-store"


async def test_unknown_state_is_refused_without_calling_intuit(client, emulator) -> None:
    before = (await emulator.get("/stats")).json()
    response = await client.get("/callback", params={"code": "abc", "state": "forged", "realmId": COMPANY_1})
    assert response.status_code == 400
    assert "text/html" in response.headers["content-type"]
    assert response.headers["referrer-policy"] == "no-referrer"
    json_answer = await client.get(
        "/callback", params={"code": "abc", "state": "forged"}, headers={"Accept": "application/json"}
    )
    assert json_answer.status_code == 400
    assert json_answer.headers["content-type"].startswith("application/problem+json")
    assert json_answer.json()["code"] == "invalid_state"
    assert (await emulator.get("/stats")).json() == before


async def test_declining_at_intuit_is_quickbooks_access_denied(client, new_connection, connect) -> None:
    conn = await new_connection()
    result = await connect(conn["id"], decision="deny")
    assert result.params["result"] == "error"
    assert result.params["error"] == "quickbooks_access_denied"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "pending"
    assert body["last_error"]["code"] == "quickbooks_access_denied"
    assert "Company Administrator" in body["last_error"]["message"]
    assert "Master admin" in body["last_error"]["message"]


async def test_non_admin_is_refused_with_the_admin_message(client, new_connection, connect) -> None:
    conn = await new_connection()
    # Carol is a standard user: Intuit refuses her; "Back to app" returns access_denied.
    result = await connect(conn["id"], email=CAROL, decision="deny")
    assert result.params["error"] == "quickbooks_access_denied"
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    assert events["items"][0]["type"] == "link_refused"


async def test_same_quickbooks_user_reconnecting_links_without_confirmation(
    client, new_connection, connect
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=BOB)
    again = await connect(conn["id"], email=BOB)
    assert again.params["result"] == "connected"


async def test_different_quickbooks_user_needs_confirmation_and_keeps_old_credentials(
    client, new_connection, connect, service_headers
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=BOB)
    before = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    result = await connect(conn["id"], email=ALICE, connect_anyway=True)
    assert result.params["result"] == "confirmation_required"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["owner"] == before["owner"]
    assert body["access_token_expires_at"] == before["access_token_expires_at"]
    pending = body["pending_link"]
    assert pending["reasons"] == ["different_quickbooks_user"]
    assert pending["quickbooks_user"]["email"] == ALICE
    assert pending["realm_id"] == COMPANY_1

    confirmed = await client.post(f"/connections/{conn['id']}/pending-link/confirm", headers=user_headers())
    assert confirmed.status_code == 200
    assert confirmed.json()["owner"]["quickbooks_user"]["email"] == ALICE
    assert confirmed.json()["pending_link"] is None
    # The confirmed credentials work: a service gets a token minted for Alice's grant.
    headers = await service_headers("tokens:read")
    token = await client.get(f"/connections/{conn['id']}/token", headers=headers)
    assert token.status_code == 200
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    linked = [e for e in events["items"] if e["type"] == "linked"]
    assert linked[0]["details"]["confirmed"] is True


async def test_force_replaces_owner_without_confirmation(client, new_connection, connect) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=BOB)
    result = await connect(conn["id"], email=ALICE, force=True, connect_anyway=True)
    assert result.params["result"] == "connected"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["owner"]["quickbooks_user"]["email"] == ALICE
    events = (await client.get(f"/connections/{conn['id']}/events", headers=user_headers())).json()
    assert events["items"][0]["type"] == "linked"
    assert events["items"][0]["details"]["forced"] is True


async def test_different_company_is_a_reason_too(client, new_connection, connect) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=DAVE, realm_id=COMPANY_1)
    result = await connect(conn["id"], email=DAVE, realm_id=COMPANY_2)
    assert result.params["result"] == "confirmation_required"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["pending_link"]["reasons"] == ["different_quickbooks_company"]
    assert body["realm_id"] == COMPANY_1


async def test_declining_a_pending_link_revokes_it_at_intuit(
    client, new_connection, connect, emulator
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=DAVE, realm_id=COMPANY_1)
    await connect(conn["id"], email=DAVE, realm_id=COMPANY_2)
    declined = await client.delete(f"/connections/{conn['id']}/pending-link", headers=user_headers())
    assert declined.status_code == 204
    grants = {g["realm_id"] for g in (await emulator.get("/grants")).json()}
    assert COMPANY_2 not in grants and COMPANY_1 in grants
    again = await client.delete(f"/connections/{conn['id']}/pending-link", headers=user_headers())
    assert again.status_code == 404 and again.json()["code"] == "no_pending_link"
    confirm = await client.post(f"/connections/{conn['id']}/pending-link/confirm", headers=user_headers())
    assert confirm.json()["code"] == "no_pending_link"


async def test_company_linked_by_another_connection_is_refused(client, new_connection, connect) -> None:
    first, second = await new_connection(), await new_connection(user="user-2")
    await connect(first["id"], email=BOB, realm_id=COMPANY_1)
    result = await connect(second["id"], email=DAVE, realm_id=COMPANY_1, user="user-2", connect_anyway=True)
    assert result.params == {
        "connection_id": second["id"],
        "result": "error",
        "error": "quickbooks_company_in_use",
    }
    body = (await client.get(f"/connections/{second['id']}", headers=user_headers())).json()
    assert body["status"] == "pending" and body["last_error"]["code"] == "quickbooks_company_in_use"


async def test_quickbooks_user_of_another_cietrade_user_is_refused_even_with_force(
    client, new_connection, connect
) -> None:
    first = await new_connection()
    await connect(first["id"], email=DAVE, realm_id=COMPANY_1, user="user-1")
    second = await new_connection(user="user-2")
    result = await connect(second["id"], email=DAVE, realm_id=COMPANY_2, user="user-2", force=True)
    assert result.params["error"] == "quickbooks_user_belongs_to_another_user"
    body = (await client.get(f"/connections/{second['id']}", headers=user_headers())).json()
    assert "Not you?" in body["last_error"]["message"]


async def test_callback_without_return_url_shows_a_result_page(new_connection, cookie_connect) -> None:
    # Only cookie mode takes no return_url: ticket mode must hand its ticket back to the frontend.
    conn = await new_connection()
    result = await cookie_connect(conn["id"], return_url=None)
    assert result.status_code == 200
    assert "Connected to QuickBooks" in result.body
    assert result.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    )


async def test_declining_another_admins_takeover_is_truthful_about_the_old_grant(
    client, new_connection, connect, emulator, service_headers
) -> None:
    conn = await new_connection()
    await connect(conn["id"], email=BOB)
    # Alice clicks "Connect anyway" at Intuit: Intuit retires Bob's grant in favour of hers.
    result = await connect(conn["id"], email=ALICE, connect_anyway=True)
    assert result.params["result"] == "confirmation_required"
    declined = await client.delete(f"/connections/{conn['id']}/pending-link", headers=user_headers())
    assert declined.status_code == 204
    assert (await emulator.get("/grants")).json() == []  # nothing is live at Intuit any more
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "reauthorization_required"
    assert body["owner"]["quickbooks_user"]["email"] == BOB  # still remembered
    assert body["last_error"]["code"] == "quickbooks_connection_revoked"
    token = await client.get(f"/connections/{conn['id']}/token", headers=await service_headers("tokens:read"))
    assert token.json()["code"] == "reauthorization_required"


async def test_intuit_outage_at_the_callback_is_503_with_retry_after(
    client, new_connection, connect, cookie_connect, emulator
) -> None:
    conn = await new_connection()
    await emulator.post("/faults", json={"endpoint": "token", "kind": "status", "status": 503, "count": 10})
    page = await cookie_connect(conn["id"], return_url=None)
    assert page.status_code == 503
    assert int(page.headers["retry-after"]) > 0
    assert "QuickBooks was not connected" in page.body
    redirected = await connect(conn["id"])
    assert redirected.params["error"] == "intuit_unavailable"
    body = (await client.get(f"/connections/{conn['id']}", headers=user_headers())).json()
    assert body["status"] == "pending" and body["last_error"]["code"] == "intuit_unavailable"
