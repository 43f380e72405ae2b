"""The Intuit emulator's browser flow, token endpoint, revoke, userinfo and CompanyInfo."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
import pytest

REDIRECT_URI = "http://localhost:8000/callback"
CLIENT_ID = "test-client"
SANDBOX = "9341452988354102"
GREENFIELD = "9341452988354203"
ALICE_SUB = "7f3c2a9e-41d8-4b6a-9e2f-a1c5d3b8e701"
BOB_SUB = "2b8e6d14-9c3f-4a71-8d5e-f04a6c2b9d12"


# -- discovery and authorize request validation ------------------------------------------------


async def test_discovery_documents_point_at_the_emulator(client: httpx.AsyncClient) -> None:
    for path in ("/.well-known/openid_sandbox_configuration", "/.well-known/openid_configuration"):
        doc = (await client.get(path)).json()
        assert doc["issuer"] == "http://127.0.0.1:9100/op/v1"
        assert doc["authorization_endpoint"] == "http://127.0.0.1:9100/connect/oauth2"
        assert doc["token_endpoint"] == "http://127.0.0.1:9100/oauth2/v1/tokens/bearer"
        assert doc["revocation_endpoint"] == "http://127.0.0.1:9100/v2/oauth2/tokens/revoke"
        assert doc["userinfo_endpoint"] == "http://127.0.0.1:9100/v1/openid_connect/userinfo"
        assert doc["jwks_uri"] == "http://127.0.0.1:9100/op/v1/jwks"
        assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
        assert doc["token_endpoint_auth_methods_supported"] == ["client_secret_basic"]


@pytest.mark.parametrize(
    "override, code",
    [
        ({"client_id": "someone-else"}, "invalid_client"),
        ({"redirect_uri": REDIRECT_URI + "/"}, "invalid_redirect_uri"),
        ({"redirect_uri": "http://localhost:8000/CALLBACK"}, "invalid_redirect_uri"),
        ({"redirect_uri": None}, "invalid_redirect_uri"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": None}, "invalid_request"),
        ({"scope": "com.intuit.quickbooks.accounting admin"}, "invalid_scope"),
        ({"scope": ""}, "invalid_scope"),
        ({"state": None}, "invalid_request"),
    ],
)
async def test_bad_authorize_requests_get_an_error_page_never_a_redirect(
    client: httpx.AsyncClient, override: dict[str, Any], code: str
) -> None:
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": "com.intuit.quickbooks.accounting",
        "state": "s",
    }
    params.update(override)
    response = await client.get("/connect/oauth2", params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 400
    assert "location" not in response.headers
    assert f'<code id="error-code">{code}</code>' in response.text


# -- the browser flow --------------------------------------------------------------------------


async def test_full_code_flow(emu: Any) -> None:
    flow = await emu.start()
    assert flow.startswith("/connect/oauth2/flow/")
    page = await emu.client.get(flow)
    assert page.status_code == 200
    assert f'id="signin-{ALICE_SUB}"' in page.text and 'id="signin-submit"' in page.text
    assert "#2CA01C" in page.text

    page = await emu.signin(flow, "bob@example.com")  # one company: no chooser
    assert "cieTrade wants to connect to Sandbox Company_US_1" in page.text
    for element in ('id="connect"', 'id="cancel"', 'id="not-you"', "bob@example.com"):
        assert element in page.text

    response = await emu.consent(flow, "allow")
    assert response.status_code == 303
    params = dict(httpx.URL(response.headers["location"]).params)
    assert set(params) == {"code", "state", "realmId"}
    assert params["state"] == "state-123" and params["realmId"] == SANDBOX
    assert len(params["code"]) >= 30

    tokens = await emu.exchange(params["code"])
    assert tokens.status_code == 200
    assert tokens.headers["intuit_tid"]
    body = tokens.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600 and body["x_refresh_token_expires_in"] == 8726400
    assert {"access_token", "refresh_token", "id_token"} <= set(body)
    assert "x_refresh_token_hard_expires_in" not in body

    grants = await emu.grants()
    assert [(g["realm_id"], g["sub"], g["live_refresh_tokens"]) for g in grants] == [(SANDBOX, BOB_SUB, 1)]
    # The flow is finished: it cannot be replayed.
    again = await emu.consent(flow, "allow")
    assert again.status_code == 400 and "location" not in again.headers


async def test_company_chooser_and_not_you(emu: Any) -> None:
    flow = await emu.start()
    page = await emu.signin(flow, "alice@example.com")
    assert f'id="company-{SANDBOX}"' in page.text and f'id="company-{GREENFIELD}"' in page.text
    chosen = await emu.client.post(f"{flow}/company", data={"realm_id": GREENFIELD})
    assert chosen.status_code == 303
    page = await emu.client.get(flow)
    assert "wants to connect to Greenfield Recycling LLC" in page.text

    signed_out = await emu.client.post(f"{flow}/signout")
    assert signed_out.status_code == 303
    page = await emu.client.get(flow)
    assert 'id="signin-submit"' in page.text and 'id="not-you"' not in page.text

    page = await emu.signin(flow, "bob@example.com")
    assert "wants to connect to Sandbox Company_US_1" in page.text
    params = dict(httpx.URL((await emu.consent(flow)).headers["location"]).params)
    assert params["realmId"] == SANDBOX


async def test_unknown_email_rerenders_sign_in(emu: Any) -> None:
    flow = await emu.start()
    response = await emu.client.post(f"{flow}/signin", data={"email": "mallory@example.com"})
    assert response.status_code == 200
    assert 'id="signin-error"' in response.text
    assert "intuit_emulator_session" not in response.cookies


async def test_non_admin_is_refused_and_sent_back_with_access_denied(emu: Any) -> None:
    flow = await emu.start(state="xyz")
    page = await emu.signin(flow, "carol@example.com")
    assert "You need to be a Master admin or Company admin to connect apps" in page.text
    assert 'id="back-to-app"' in page.text and 'id="connect"' not in page.text
    forced = await emu.consent(flow, "allow")
    assert forced.status_code == 403 and "location" not in forced.headers
    back = await emu.consent(flow, "deny")
    assert back.status_code == 303
    assert back.headers["location"] == f"{REDIRECT_URI}?error=access_denied&state=xyz"


async def test_cancel_returns_access_denied_without_description(emu: Any) -> None:
    flow = await emu.start(state="a b&c")
    await emu.signin(flow, "bob@example.com")
    response = await emu.consent(flow, "deny")
    params = dict(httpx.URL(response.headers["location"]).params)
    assert params == {"error": "access_denied", "state": "a b&c"}


async def test_realm_id_only_with_a_company_scope(emu: Any) -> None:
    params = await emu.connect("bob@example.com", scope="openid email")
    assert set(params) == {"code", "state"}
    body = (await emu.exchange(params["code"])).json()
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert "realmid" not in claims
    info = (await emu.userinfo(body["access_token"])).json()
    assert info == {"sub": BOB_SUB, "email": "bob@example.com", "emailVerified": True}


# -- token endpoint ----------------------------------------------------------------------------


async def test_code_is_single_use_and_replay_revokes_its_grant(emu: Any) -> None:
    params = await emu.connect("bob@example.com")
    first = await emu.exchange(params["code"])
    assert first.status_code == 200
    replay = await emu.exchange(params["code"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert "error_description" in replay.json()
    refresh = await emu.refresh(first.json()["refresh_token"])
    assert refresh.json()["error"] == "invalid_grant"
    assert (await emu.userinfo(first.json()["access_token"])).status_code == 401
    assert await emu.grants() == []


async def test_code_bound_to_redirect_uri_and_expiry(emu: Any) -> None:
    params = await emu.connect("bob@example.com")
    wrong = await emu.exchange(params["code"], redirect_uri="http://localhost:8000/other")
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert (await emu.exchange("AB11-made-up")).json()["error"] == "invalid_grant"

    await emu.client.post("/_emulator/config", json={"code_ttl": 1})
    params = await emu.connect("bob@example.com")
    await emu.client.post("/_emulator/clock", json={"advance_s": 5})
    expired = await emu.exchange(params["code"])
    assert expired.status_code == 400 and expired.json()["error"] == "invalid_grant"


async def test_refresh_rotates_every_time(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    first = await emu.refresh(tokens["refresh_token"])
    assert first.status_code == 200
    body = first.json()
    assert body["refresh_token"] != tokens["refresh_token"]
    assert body["access_token"] != tokens["access_token"]
    assert "id_token" not in body
    # The old refresh token died at that moment; the old access token lives until it expires.
    reuse = await emu.refresh(tokens["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert (await emu.userinfo(tokens["access_token"])).status_code == 200
    second = await emu.refresh(body["refresh_token"])
    assert second.status_code == 200
    [grant] = await emu.grants()
    assert grant["refresh_count"] == 2 and grant["live_refresh_tokens"] == 1
    stats = (await emu.client.get("/_emulator/stats")).json()
    assert stats["token"]["refresh_token"] == {"ok": 2, "invalid_grant": 1}
    assert stats["refresh_by_realm"][SANDBOX]["ok"] == 2


async def test_access_and_refresh_tokens_expire(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await emu.client.post("/_emulator/clock", json={"advance_s": 3601})
    assert (await emu.userinfo(tokens["access_token"])).status_code == 401
    assert (await emu.refresh(tokens["refresh_token"])).status_code == 200
    await emu.client.post("/_emulator/clock", json={"advance_s": 8726401})
    latest = await emu.grants()
    assert latest[0]["live_refresh_tokens"] == 0


async def test_hard_expiry_header(emu: Any) -> None:
    params = await emu.connect("bob@example.com")
    response = await emu.exchange(params["code"], **{"x-include-refresh-token-hard-expires-in": "true"})
    assert 0 < response.json()["x_refresh_token_hard_expires_in"] <= 5 * 365 * 24 * 3600


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + "dGVzdC1jbGllbnQ6d3Jvbmc="},  # test-client:wrong
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!"},
    ],
)
async def test_invalid_client(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post(
        "/oauth2/v1/tokens/bearer",
        headers=headers,
        data={"grant_type": "refresh_token", "refresh_token": "x"},
    )
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}
    assert response.headers["intuit_tid"]


async def test_client_secret_post_is_not_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/oauth2/v1/tokens/bearer",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_id": CLIENT_ID,
            "client_secret": "test-secret",
        },
    )
    assert response.status_code == 401


async def test_grant_type_and_parameter_errors(emu: Any) -> None:
    async def post(data: dict[str, str]) -> httpx.Response:
        return await emu.client.post("/oauth2/v1/tokens/bearer", data=data, headers=emu.basic())

    assert (await post({"grant_type": "password"})).json()["error"] == "unsupported_grant_type"
    assert (await post({})).json()["error"] == "invalid_request"
    assert (await post({"grant_type": "refresh_token"})).json()["error"] == "invalid_request"
    missing = await post({"grant_type": "authorization_code", "code": "x"})
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    as_json = await emu.client.post(
        "/oauth2/v1/tokens/bearer",
        headers=emu.basic(),
        json={"grant_type": "refresh_token", "refresh_token": "x"},
    )
    assert as_json.json()["error"] == "invalid_request"


# -- one grant per app and company: Switch Admin -----------------------------------------------


async def test_switch_admin_replaces_the_grant_and_kills_old_tokens(emu: Any) -> None:
    bob = await emu.tokens("bob@example.com")
    old_refresh = (await emu.refresh(bob["refresh_token"])).json()

    emu.client.cookies.clear()
    flow = await emu.start()
    page = await emu.signin(flow, "alice@example.com")
    assert 'id="company-' in page.text
    await emu.client.post(f"{flow}/company", data={"realm_id": SANDBOX})
    page = await emu.client.get(flow)
    assert 'id="connect-anyway"' in page.text and "Bob Builder" in page.text
    assert "bob@example.com" in page.text and 'id="connect"' not in page.text
    # Plain allow is not enough: the page is shown again.
    plain = await emu.consent(flow, "allow")
    assert plain.status_code == 200 and 'id="connect-anyway"' in plain.text
    response = await emu.consent(flow, "allow", connect_anyway="true")
    alice = await emu.exchange(dict(httpx.URL(response.headers["location"]).params)["code"])
    assert alice.status_code == 200

    assert (await emu.refresh(old_refresh["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await emu.userinfo(bob["access_token"])).status_code == 401
    assert (await emu.companyinfo(old_refresh["access_token"])).status_code == 401
    assert (await emu.companyinfo(alice.json()["access_token"])).status_code == 200
    grants = await emu.grants()
    assert [(g["realm_id"], g["sub"]) for g in grants] == [(SANDBOX, ALICE_SUB)]


async def test_same_user_reconnecting_replaces_the_grant(emu: Any) -> None:
    first = await emu.tokens("bob@example.com")
    second = await emu.tokens("bob@example.com")
    assert (await emu.refresh(first["refresh_token"])).status_code == 400
    assert (await emu.refresh(second["refresh_token"])).status_code == 200
    assert len(await emu.grants()) == 1


async def test_grants_are_per_company(emu: Any) -> None:
    await emu.tokens("dave@example.com", GREENFIELD)
    await emu.tokens("bob@example.com")
    grants = sorted((g["realm_id"], g["owner_email"]) for g in await emu.grants())
    assert grants == [(SANDBOX, "bob@example.com"), (GREENFIELD, "dave@example.com")]


# -- revoke, disconnect, userinfo, companyinfo -------------------------------------------------


@pytest.mark.parametrize("which", ["refresh_token", "access_token"])
async def test_revoke_kills_the_whole_grant(emu: Any, which: str) -> None:
    tokens = await emu.tokens("bob@example.com")
    response = await emu.revoke(tokens[which])
    assert response.status_code == 200 and response.content == b""
    assert response.headers["intuit_tid"]
    assert (await emu.refresh(tokens["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await emu.userinfo(tokens["access_token"])).status_code == 401
    assert await emu.grants() == []
    assert (await emu.revoke(tokens[which])).status_code == 200  # idempotent


async def test_revoke_errors(emu: Any) -> None:
    bad_client = await emu.client.post(
        "/v2/oauth2/tokens/revoke", json={"token": "x"}, headers=emu.basic(secret="nope")
    )
    assert bad_client.status_code == 401 and bad_client.json() == {"error": "invalid_client"}
    form = await emu.client.post("/v2/oauth2/tokens/revoke", data={"token": "x"}, headers=emu.basic())
    assert form.status_code == 400
    empty = await emu.client.post("/v2/oauth2/tokens/revoke", json={}, headers=emu.basic())
    assert empty.status_code == 400


async def test_disconnect_inside_quickbooks(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    response = await emu.client.post(f"/_emulator/companies/{SANDBOX}/disconnect")
    assert response.json() == {"realm_id": SANDBOX, "revoked_grants": 1}
    assert (await emu.refresh(tokens["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await emu.companyinfo(tokens["access_token"])).status_code == 401


async def test_userinfo_shape_and_errors(emu: Any) -> None:
    tokens = await emu.tokens("alice@example.com", GREENFIELD)
    info = await emu.userinfo(tokens["access_token"])
    assert info.status_code == 200 and info.headers["intuit_tid"]
    assert info.json() == {
        "sub": ALICE_SUB,
        "email": "alice@example.com",
        "emailVerified": True,
        "givenName": "Alice",
        "familyName": "Admin",
    }
    bad = await emu.userinfo("eyJ-not-a-token")
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    missing = await emu.client.get("/v1/openid_connect/userinfo")
    assert missing.status_code == 401

    no_email = await emu.tokens("bob@example.com", scope="com.intuit.quickbooks.accounting openid profile")
    info = (await emu.userinfo(no_email["access_token"])).json()
    assert set(info) == {"sub", "givenName", "familyName"}


async def test_companyinfo_shape_and_faults(emu: Any) -> None:
    tokens = await emu.tokens("alice@example.com", GREENFIELD)
    response = await emu.companyinfo(tokens["access_token"], GREENFIELD)
    assert response.status_code == 200 and response.headers["intuit_tid"]
    body = response.json()
    info = body["CompanyInfo"]
    assert info["CompanyName"] == "Greenfield Recycling LLC"
    assert {"LegalName", "Country", "Id"} <= set(info) and body["time"]

    other_realm = await emu.companyinfo(tokens["access_token"], SANDBOX)
    assert other_realm.status_code == 401
    fault = other_realm.json()["Fault"]
    assert fault["type"] == "AUTHENTICATION"
    assert fault["Error"][0]["code"] == "3200"
    assert fault["Error"][0]["Message"] == ("message=AuthenticationFailed; errorCode=003200; statusCode=401")
    assert (await emu.companyinfo("garbage", GREENFIELD)).status_code == 401


# -- id_token ----------------------------------------------------------------------------------


async def test_id_token_verifies_with_the_jwks(emu: Any) -> None:
    tokens = await emu.tokens("dave@example.com", GREENFIELD)
    discovery = (await emu.client.get("/.well-known/openid_sandbox_configuration")).json()
    jwks = (await emu.client.get("/op/v1/jwks")).json()
    header = jwt.get_unverified_header(tokens["id_token"])
    assert header["alg"] == "RS256"
    [key] = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    claims = jwt.decode(
        tokens["id_token"],
        jwt.PyJWK(key).key,
        algorithms=["RS256"],
        audience=CLIENT_ID,
        issuer=discovery["issuer"],
    )
    assert claims["aud"] == [CLIENT_ID]
    assert claims["realmid"] == GREENFIELD
    assert claims["sub"] == "5d0b8c3e-7a19-4f2d-a6e4-9b3c1d7e5f34"
    assert {"iat", "exp", "auth_time"} <= set(claims)
    assert not {"email", "name", "given_name"} & set(claims)
