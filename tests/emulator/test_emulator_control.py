"""The emulator's control API: faults, stats, concurrency, reset, persistence and the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from service.emulator import EmulatorSettings, create_app

SANDBOX = "9341452988354102"
REDIRECT_URI = "http://localhost:8000/callback"


async def fault(emu: Any, **spec: Any) -> None:
    response = await emu.client.post("/_emulator/faults", json=spec)
    assert response.status_code == 201, response.text


async def stats(emu: Any) -> dict[str, Any]:
    return (await emu.client.get("/_emulator/stats")).json()


# -- faults ------------------------------------------------------------------------------------


async def test_status_faults_hit_the_next_n_calls_only(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await fault(emu, endpoint="token", kind="status", status=503, count=2)
    for _ in range(2):
        response = await emu.refresh(tokens["refresh_token"])
        assert response.status_code == 503 and response.headers["intuit_tid"]
        assert response.json()["error"] == "temporarily_unavailable"
    # Nothing reached the grant: the refresh token is still the live one.
    assert (await emu.refresh(tokens["refresh_token"])).status_code == 200
    counts = await stats(emu)
    assert counts["token"]["refresh_token"] == {"status_503": 2, "ok": 1}
    assert counts["faults_fired"] == {"token": 2}
    assert (await emu.client.get("/_emulator/faults")).json() == []


async def test_429_carries_retry_after_and_companyinfo_faults_are_fault_shaped(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await fault(emu, endpoint="companyinfo", kind="status", status=429)
    throttled = await emu.companyinfo(tokens["access_token"])
    assert throttled.status_code == 429 and throttled.headers["retry-after"]
    assert throttled.json()["Fault"]["Error"][0]["code"] == "3001"
    await fault(emu, endpoint="userinfo", kind="status", status=500)
    assert (await emu.userinfo(tokens["access_token"])).status_code == 500
    await fault(emu, endpoint="revoke", kind="status", status=503)
    assert (await emu.revoke(tokens["refresh_token"])).status_code == 503
    assert len(await emu.grants()) == 1


async def test_timeout_fault_delays_then_answers(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await fault(emu, endpoint="userinfo", kind="timeout", delay_s=0.3)
    started = time.monotonic()
    response = await emu.userinfo(tokens["access_token"])
    assert response.status_code == 200 and time.monotonic() - started >= 0.3


async def test_drop_after_rotate_waits_for_a_refresh(emu: Any) -> None:
    await fault(emu, endpoint="token", kind="drop_after_rotate", delay_s=0.01)
    # A code exchange passes the fault by; the next refresh gets it.
    tokens = await emu.tokens("bob@example.com")
    assert len((await emu.client.get("/_emulator/faults")).json()) == 1
    late = await emu.refresh(tokens["refresh_token"])
    assert late.status_code == 200
    counts = await stats(emu)
    assert counts["token"]["refresh_token"] == {"dropped_after_rotate": 1}


async def test_fault_validation_and_clearing(emu: Any) -> None:
    bad = await emu.client.post(
        "/_emulator/faults", json={"endpoint": "userinfo", "kind": "drop_after_rotate"}
    )
    assert bad.status_code == 422
    await fault(emu, endpoint="userinfo", kind="status", count=3)
    assert (await emu.client.delete("/_emulator/faults")).status_code == 204
    assert (await emu.client.get("/_emulator/faults")).json() == []


async def test_drop_after_rotate_cuts_a_real_connection(live_server: str, emu_for: Any) -> None:
    async with httpx.AsyncClient(base_url=live_server, timeout=5) as http:
        emu = emu_for(http)
        tokens = await emu.tokens("bob@example.com")
        await fault(emu, endpoint="token", kind="drop_after_rotate")
        with pytest.raises(httpx.TransportError):
            await emu.refresh(tokens["refresh_token"])
        # Intuit rotated before the answer was lost: the token the client still holds is dead.
        dead = await emu.refresh(tokens["refresh_token"])
        assert dead.status_code == 400 and dead.json()["error"] == "invalid_grant"
        assert "rotated" in dead.json()["error_description"]
        counts = (await http.get("/_emulator/stats")).json()
        assert counts["refresh_by_realm"][SANDBOX] == {"dropped_after_rotate": 1, "invalid_grant": 1}
        [grant] = await emu.grants()
        assert grant["refresh_count"] == 1 and grant["live_refresh_tokens"] == 1

        await fault(emu, endpoint="userinfo", kind="timeout", delay_s=1)
        with pytest.raises(httpx.ReadTimeout):
            await http.get(
                "/v1/openid_connect/userinfo",
                timeout=0.2,
                headers={"Authorization": f"Bearer {tokens['access_token']}"},
            )


# -- concurrency and stats ---------------------------------------------------------------------


async def test_concurrent_refreshes_of_one_token_only_one_wins(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await emu.client.post("/_emulator/config", json={"latency_ms": 30})
    results = await asyncio.gather(*(emu.refresh(tokens["refresh_token"]) for _ in range(120)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 1 and codes.count(400) == 119
    [grant] = await emu.grants()
    assert grant["live_refresh_tokens"] == 1 and grant["refresh_count"] == 1
    counts = await stats(emu)
    assert counts["max_concurrent_refresh"][SANDBOX] == 120
    assert counts["refresh_by_realm"][SANDBOX] == {"ok": 1, "invalid_grant": 119}
    assert counts["in_flight_refresh"] == {}


async def test_sequential_refreshes_never_overlap(emu: Any) -> None:
    tokens = await emu.tokens("bob@example.com")
    await emu.client.post("/_emulator/config", json={"latency_ms": 5})
    refresh_token = tokens["refresh_token"]
    for _ in range(5):
        refresh_token = (await emu.refresh(refresh_token)).json()["refresh_token"]
    assert (await stats(emu))["max_concurrent_refresh"] == {SANDBOX: 1}


# -- users, companies, config, reset -----------------------------------------------------------


async def test_new_users_and_companies_can_connect(emu: Any) -> None:
    company = await emu.client.post("/_emulator/companies", json={"name": "Acme Metals"})
    assert company.status_code == 201
    realm = company.json()["realm_id"]
    assert realm.isdigit() and len(realm) == 16
    user = await emu.client.post(
        "/_emulator/users",
        json={
            "email": "erin@example.com",
            "given_name": "Erin",
            "family_name": "Example",
            "companies": {realm: "company_admin"},
        },
    )
    assert user.status_code == 201 and user.json()["sub"]
    params = await emu.connect("erin@example.com")
    assert params["realmId"] == realm

    duplicate = await emu.client.post(
        "/_emulator/users", json={"email": "ERIN@example.com", "given_name": "E", "family_name": "E"}
    )
    assert duplicate.status_code == 409
    unknown_realm = await emu.client.post(
        "/_emulator/users",
        json={
            "email": "x@example.com",
            "given_name": "X",
            "family_name": "Y",
            "companies": {"1234567890": "standard"},
        },
    )
    assert unknown_realm.status_code == 422


async def test_roles_can_change(emu: Any) -> None:
    bob = "2b8e6d14-9c3f-4a71-8d5e-f04a6c2b9d12"
    await emu.client.post(f"/_emulator/users/{bob}/roles", json={"companies": {SANDBOX: "standard"}})
    emu.client.cookies.clear()
    flow = await emu.start()
    page = await emu.signin(flow, "bob@example.com")
    assert 'id="back-to-app"' in page.text


async def test_session_signin_shortcut(emu: Any) -> None:
    response = await emu.client.post("/_emulator/sessions/signin", json={"email": "bob@example.com"})
    assert response.status_code == 200
    flow = await emu.start()
    page = await emu.client.get(flow)
    assert 'id="connect"' in page.text


async def test_reset_restores_the_seed(emu: Any) -> None:
    await emu.tokens("bob@example.com")
    await emu.client.post("/_emulator/config", json={"access_token_ttl": 5, "latency_ms": 3})
    await emu.client.post(
        "/_emulator/users", json={"email": "temp@example.com", "given_name": "T", "family_name": "T"}
    )
    await fault(emu, endpoint="token", kind="status")
    await emu.client.post("/_emulator/reset")
    assert await emu.grants() == []
    assert len((await emu.client.get("/_emulator/users")).json()) == 4
    config = (await emu.client.get("/_emulator/config")).json()
    assert config["access_token_ttl"] == 3600 and config["latency_ms"] == 0
    assert (await emu.client.get("/_emulator/faults")).json() == []
    assert (await stats(emu))["token"] == {}
    # Sessions were dropped too: the flow starts at sign-in again.
    flow = await emu.start()
    assert 'id="signin-submit"' in (await emu.client.get(flow)).text


async def test_config_changes_token_lifetimes(emu: Any) -> None:
    await emu.client.post("/_emulator/config", json={"access_token_ttl": 60, "refresh_token_ttl": 120})
    tokens = await emu.tokens("bob@example.com")
    assert tokens["expires_in"] == 60 and tokens["x_refresh_token_expires_in"] == 120


# -- persistence and the command line ----------------------------------------------------------


async def test_state_file_round_trip(state_file: Any, emu_for: Any, settings_for: Any) -> None:
    settings = settings_for(state_file=str(state_file))

    def client_for(app: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9100")

    async with client_for(create_app(settings)) as http:
        emu = emu_for(http)
        await http.post(
            "/_emulator/users",
            json={
                "email": "pat@example.com",
                "given_name": "Pat",
                "family_name": "Persist",
                "companies": {SANDBOX: "company_admin"},
            },
        )
        tokens = await emu.tokens("pat@example.com")
        kid = (await http.get("/op/v1/jwks")).json()["keys"][0]["kid"]
    saved = json.loads(state_file.read_text())
    assert saved["version"] == 1 and len(saved["grants"]) == 1

    async with client_for(create_app(settings)) as http:
        emu = emu_for(http)
        assert (await http.get("/op/v1/jwks")).json()["keys"][0]["kid"] == kid
        users = {u["email"] for u in (await http.get("/_emulator/users")).json()}
        assert "pat@example.com" in users
        assert (await emu.userinfo(tokens["access_token"])).status_code == 200
        rotated = await emu.refresh(tokens["refresh_token"])
        assert rotated.status_code == 200

    async with client_for(create_app(settings)) as http:
        emu = emu_for(http)
        assert (await emu.refresh(tokens["refresh_token"])).status_code == 400
        assert (await emu.refresh(rotated.json()["refresh_token"])).status_code == 200


def test_settings_defaults() -> None:
    settings = EmulatorSettings(public_url="http://127.0.0.1:9100/")
    assert settings.public_url == "http://127.0.0.1:9100"
    assert settings.client_id == "dev-client-id"
    assert settings.client_secret == "dev-client-secret"
    assert settings.redirect_uris == ["http://localhost:8000/callback"]
    assert (settings.access_token_ttl, settings.refresh_token_ttl, settings.code_ttl) == (3600, 8726400, 600)
    assert settings.latency_ms == 0 and settings.seed is True and settings.state_file is None


async def test_unseeded_emulator_is_empty(settings_for: Any) -> None:
    app = create_app(settings_for(seed=False))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9100"
    ) as http:
        assert (await http.get("/_emulator/users")).json() == []


def test_module_runs_with_uvicorn(tmp_path: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--public-url",
            "http://emulator.test:1234",
            "--internal-url",
            "http://emu:9100/",
            "--client-id",
            "cid",
            "--client-secret",
            "csecret",
            "--redirect-uri",
            REDIRECT_URI,
            "--redirect-uri",
            "http://localhost:9999/cb",
            "--state-file",
            str(state),
            "--log-level",
            "warning",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                doc = httpx.get(f"http://127.0.0.1:{port}/.well-known/openid_configuration")
                break
            except httpx.TransportError:
                assert process.poll() is None, "the emulator exited"
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        assert doc.json()["token_endpoint"] == "http://emu:9100/oauth2/v1/tokens/bearer"
        assert doc.json()["jwks_uri"] == "http://emu:9100/op/v1/jwks"
        assert doc.json()["authorization_endpoint"] == "http://emulator.test:1234/connect/oauth2"
        authorize = httpx.get(
            f"http://127.0.0.1:{port}/connect/oauth2",
            params={
                "client_id": "cid",
                "response_type": "code",
                "scope": "openid",
                "redirect_uri": "http://localhost:9999/cb",
                "state": "s",
            },
        )
        assert authorize.status_code == 302
        assert state.exists()
    finally:
        process.terminate()
        process.wait(timeout=10)
