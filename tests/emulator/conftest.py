"""Fixtures for the Intuit emulator's own tests: an in-process app and a browser-like client."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn

from service.emulator import EmulatorSettings, create_app

PUBLIC_URL = "http://127.0.0.1:9100"
REDIRECT_URI = "http://localhost:8000/callback"
CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret"
SCOPES = "com.intuit.quickbooks.accounting openid email profile"
SANDBOX = "9341452988354102"
GREENFIELD = "9341452988354203"


def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


class Emu:
    """Drives the emulator the way a browser and the broker would."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @staticmethod
    def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> dict[str, str]:
        return basic(client_id, secret)

    async def start(
        self, scope: str = SCOPES, state: str = "state-123", redirect_uri: str = REDIRECT_URI
    ) -> str:
        response = await self.client.get(
            "/connect/oauth2",
            params={
                "client_id": CLIENT_ID,
                "response_type": "code",
                "scope": scope,
                "redirect_uri": redirect_uri,
                "state": state,
            },
        )
        assert response.status_code == 302, response.text
        return response.headers["location"]

    async def signin(self, flow: str, email: str) -> httpx.Response:
        response = await self.client.post(f"{flow}/signin", data={"email": email})
        assert response.status_code == 303, response.text
        return await self.client.get(flow)

    async def consent(self, flow: str, decision: str = "allow", **extra: str) -> httpx.Response:
        return await self.client.post(f"{flow}/consent", data={"decision": decision, **extra})

    async def connect(
        self,
        email: str,
        realm: str | None = None,
        *,
        scope: str = SCOPES,
        connect_anyway: bool = False,
        state: str = "state-123",
    ) -> dict[str, str]:
        """Sign in fresh as `email`, pick `realm` if asked, allow; the callback's parameters."""
        self.client.cookies.clear()
        flow = await self.start(scope=scope, state=state)
        page = await self.signin(flow, email)
        if 'id="company-' in page.text:
            assert realm is not None, "the user has several companies"
            response = await self.client.post(f"{flow}/company", data={"realm_id": realm})
            assert response.status_code == 303
        extra = {"connect_anyway": "true"} if connect_anyway else {}
        response = await self.consent(flow, "allow", **extra)
        assert response.status_code == 303, response.text
        return callback_params(response)

    async def exchange(self, code: str, redirect_uri: str = REDIRECT_URI, **headers: str) -> httpx.Response:
        return await self.client.post(
            "/oauth2/v1/tokens/bearer",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri},
            headers={**basic(), "Accept": "application/json", **headers},
        )

    async def refresh(self, refresh_token: str) -> httpx.Response:
        return await self.client.post(
            "/oauth2/v1/tokens/bearer",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            headers={**basic(), "Accept": "application/json"},
        )

    async def tokens(self, email: str, realm: str | None = None, **kw: Any) -> dict[str, Any]:
        params = await self.connect(email, realm, **kw)
        response = await self.exchange(params["code"])
        assert response.status_code == 200, response.text
        return response.json()

    async def revoke(self, token: str) -> httpx.Response:
        return await self.client.post("/v2/oauth2/tokens/revoke", json={"token": token}, headers=basic())

    async def userinfo(self, access_token: str) -> httpx.Response:
        return await self.client.get(
            "/v1/openid_connect/userinfo", headers={"Authorization": f"Bearer {access_token}"}
        )

    async def companyinfo(self, access_token: str, realm: str = SANDBOX) -> httpx.Response:
        return await self.client.get(
            f"/v3/company/{realm}/companyinfo/{realm}",
            params={"minorversion": "75"},
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )

    async def grants(self) -> list[dict[str, Any]]:
        return (await self.client.get("/_emulator/grants")).json()


def callback_params(response: httpx.Response) -> dict[str, str]:
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def make_settings(**overrides: Any) -> EmulatorSettings:
    values: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [REDIRECT_URI],
    }
    return EmulatorSettings(**{**values, **overrides})


@pytest.fixture
def settings() -> EmulatorSettings:
    return make_settings()


@pytest.fixture
async def client(settings: EmulatorSettings) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as http:
        yield http


@pytest.fixture
def emu(client: httpx.AsyncClient) -> Emu:
    return Emu(client)


@pytest.fixture
def state_file(tmp_path: Any) -> Any:
    return tmp_path / "emulator-state.json"


@pytest.fixture
def live_server(settings: EmulatorSettings) -> Iterator[str]:
    """The emulator behind a real uvicorn socket (in a thread), for connection-level faults."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the emulator did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def emu_for() -> type[Emu]:
    """Build an `Emu` around any client (a second app, a real socket)."""
    return Emu


@pytest.fixture
def settings_for() -> Callable[..., EmulatorSettings]:
    """Test settings with overrides (state_file, seed, ...)."""
    return make_settings
