"""Fixtures: a real PostgreSQL migrated by Alembic, the Intuit emulator and the broker as real
HTTP servers, and callers (user JWTs, service API keys)."""

from __future__ import annotations

import asyncio
import base64
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth.api_keys import create_api_key
from service.auth.jwt import issue_dev_token
from service.core.config import Settings
from service.core.db.engine import build_engine, build_sessionmaker
from service.core.db.migrations import upgrade_to_head
from service.emulator import EmulatorSettings
from service.emulator import create_app as create_emulator
from service.main import create_app
from tests.support import database
from tests.support.intuit_user import CallbackResult, sign_in_and_decide
from tests.support.servers import ThreadedServer, free_port

JWT_SECRET = "test-jwt-secret-" + "x" * 32
ENCRYPTION_KEY = "k1:" + base64.b64encode(bytes(range(32))).decode()
CLIENT_ID, CLIENT_SECRET = "test-client-id", "test-client-secret"
RETURN_URL = "https://app.cietrade.test/integrations/quickbooks"
TENANT = "tenant-a"

# Seeded by the emulator.
COMPANY_1 = "9341452988354102"
COMPANY_2 = "9341452988354203"
ALICE, BOB, CAROL, DAVE = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    # A directory of our own (not pytest's tmp tree, which concurrent runs prune): the embedded
    # server runs as another system user when the tests run as root, and must reach it.
    with (
        tempfile.TemporaryDirectory(prefix="qbo-test-pg-") as pg_dir,
        database.postgres_server(Path(pg_dir)) as admin,
    ):
        url = asyncio.run(database.create_database(admin))
        upgrade_to_head(url)  # the real migrations, as in production
        yield url
        asyncio.run(database.drop_database(admin, url))


@dataclass
class Stack:
    broker_url: str
    emulator_url: str
    database_url: str
    settings: Settings
    # Intuit accepts only registered redirect URIs: the cookie-mode broker's port is reserved
    # (and its callback registered) when the emulator starts.
    cookie_broker_port: int


def broker_settings(database_url: str, broker_port: int, emulator_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "BROKER_PUBLIC_URL": f"http://127.0.0.1:{broker_port}",
        "INTUIT_CLIENT_ID": CLIENT_ID,
        "INTUIT_CLIENT_SECRET": CLIENT_SECRET,
        "INTUIT_DISCOVERY_URL": f"{emulator_url}/.well-known/openid_sandbox_configuration",
        "INTUIT_API_BASE_URL": emulator_url,
        "BROKER_RETURN_URL_ALLOWLIST": "https://app.cietrade.test",
        "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
        "BROKER_JWT_SECRET": JWT_SECRET,
        "BROKER_BACKGROUND_ENABLED": False,
        "INTUIT_BACKOFF_SECONDS": 0.01,
        "INTUIT_TIMEOUT_SECONDS": 5,
        # Some tests link dozens of companies to one tenant; the cap itself is tested on brokers
        # of its own (tests/hostile/test_connection_limit.py).
        "BROKER_MAX_CONNECTIONS_PER_TENANT": 1000,
        # Intuit's webhooks are verified (and refused unsigned) as in production.
        "INTUIT_WEBHOOK_VERIFIER_TOKENS": "test-intuit-verifier-token",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    broker_port, emulator_port, cookie_port = free_port(), free_port(), free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    settings = broker_settings(database_url, broker_port, emulator_url)
    emulator = ThreadedServer(
        create_emulator(
            EmulatorSettings(
                public_url=emulator_url,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                redirect_uris=[settings.redirect_uri, f"http://127.0.0.1:{cookie_port}/callback"],
            )
        ),
        emulator_port,
    ).start()
    broker = ThreadedServer(create_app(settings), broker_port).start()
    yield Stack(broker.url, emulator.url, database_url, settings, cookie_port)
    broker.stop()
    emulator.stop()


@pytest.fixture(scope="session")
def cookie_broker(stack: Stack) -> Iterator[str]:
    """A second broker on the same database and emulator, with BROKER_CONNECT_BINDING=cookie
    (the broker on the frontend's own site); its URL."""
    settings = broker_settings(
        stack.database_url, stack.cookie_broker_port, stack.emulator_url, BROKER_CONNECT_BINDING="cookie"
    )
    broker = ThreadedServer(create_app(settings), stack.cookie_broker_port).start()
    yield broker.url
    broker.stop()


@pytest.fixture(autouse=True)
async def _clean_state(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test starts from empty tables and a freshly seeded emulator."""
    if "stack" in request.fixturenames:
        stack: Stack = request.getfixturevalue("stack")
        await database.truncate_all(stack.database_url)
        async with httpx.AsyncClient(base_url=stack.emulator_url) as emu:
            (await emu.post("/_emulator/reset")).raise_for_status()
    yield


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.broker_url, timeout=30) as http:
        yield http


@pytest.fixture
async def emulator(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{stack.emulator_url}/_emulator", timeout=30) as http:
        yield http


def user_headers(tenant: str = TENANT, user: str = "user-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_dev_token(JWT_SECRET, tenant_id=tenant, user_id=user)}"}


@pytest.fixture
def service_headers(stack: Stack) -> Callable[..., Awaitable[dict[str, str]]]:
    async def make(*scopes: str, name: str = "billing") -> dict[str, str]:
        engine = build_engine(stack.database_url, pool_size=1)
        try:
            async with build_sessionmaker(engine)() as session, session.begin():
                _, key = await create_api_key(session, name=name, scopes=list(scopes))
        finally:
            await engine.dispose()
        return {"X-API-Key": key}

    return make


@pytest.fixture
def connect(client: httpx.AsyncClient) -> Callable[..., Awaitable[CallbackResult]]:
    """Authorize a connection and walk Intuit's pages as the given QuickBooks user."""

    async def run(
        connection_id: str,
        *,
        email: str = ALICE,
        realm_id: str | None = COMPANY_1,
        user: str = "user-1",
        tenant: str = TENANT,
        force: bool = False,
        return_url: str | None = RETURN_URL,
        decision: str = "allow",
        connect_anyway: bool = False,
    ) -> CallbackResult:
        body: dict[str, Any] = {"force": force}
        if return_url:
            body["return_url"] = return_url
        headers = user_headers(tenant, user)
        started = await client.post(f"/connections/{connection_id}/authorize", json=body, headers=headers)
        assert started.status_code == 200, started.text
        result = await sign_in_and_decide(
            started.json()["authorization_url"],
            email=email,
            realm_id=realm_id,
            decision=decision,
            connect_anyway=connect_anyway,
        )
        return await finish_connect(client, result, headers)

    return run


async def finish_connect(
    client: httpx.AsyncClient, result: CallbackResult, headers: dict[str, str]
) -> CallbackResult:
    """What the frontend does when the callback hands back a completion ticket: redeem it as the
    user who started Connect. `params` then reads as the callback's did before tickets:
    `result` connected / confirmation_required / error (with `error`, the problem's code)."""
    if result.params.get("result") != "completion_required":
        return result
    result.callback_params = dict(result.params)
    ticket = result.params["completion_ticket"]
    completed = await client.post(
        f"/connections/{result.params['connection_id']}/complete",
        json={"completion_ticket": ticket},
        headers=headers,
    )
    result.completion = completed
    params = {"connection_id": result.params["connection_id"]}
    if completed.status_code == 200:
        pending = completed.json()["pending_link"]
        params["result"] = "confirmation_required" if pending else "connected"
    else:
        params.update(result="error", error=completed.json()["code"])
    result.params = params
    return result


@pytest.fixture
def cookie_connect(cookie_broker: str) -> Callable[..., Awaitable[CallbackResult]]:
    """As `connect`, against the cookie-mode broker: authorize sets the browser-binding cookie,
    and the same browser carries it to the callback (`with_cookie=False`: another browser)."""

    async def run(
        connection_id: str,
        *,
        email: str = ALICE,
        realm_id: str | None = COMPANY_1,
        user: str = "user-1",
        tenant: str = TENANT,
        return_url: str | None = RETURN_URL,
        with_cookie: bool = True,
        force: bool = False,
    ) -> CallbackResult:
        body: dict[str, Any] = {"force": force}
        if return_url:
            body["return_url"] = return_url
        async with httpx.AsyncClient(base_url=cookie_broker, timeout=30) as http:
            started = await http.post(
                f"/connections/{connection_id}/authorize", json=body, headers=user_headers(tenant, user)
            )
        assert started.status_code == 200, started.text
        name, _, rest = started.headers["set-cookie"].partition("=")
        cookies = {name: rest.split(";")[0]} if with_cookie else None
        result = await sign_in_and_decide(
            started.json()["authorization_url"], email=email, realm_id=realm_id, cookies=cookies
        )
        result.headers.setdefault("x-authorize-set-cookie", started.headers["set-cookie"])
        return result

    return run


@pytest.fixture
def new_connection(client: httpx.AsyncClient) -> Callable[..., Awaitable[dict[str, Any]]]:
    async def make(tenant: str = TENANT, user: str = "user-1") -> dict[str, Any]:
        response = await client.post("/connections", json={}, headers=user_headers(tenant, user))
        assert response.status_code == 201, response.text
        return dict(response.json())

    return make


@pytest.fixture
def linked(
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
    connect: Callable[..., Awaitable[CallbackResult]],
) -> Callable[..., Awaitable[str]]:
    """A new connection of the tenant, linked through the Connect flow; returns its id."""

    async def make(*, email: str = ALICE, realm_id: str = COMPANY_1) -> str:
        conn = await new_connection()
        result = await connect(conn["id"], email=email, realm_id=realm_id)
        assert result.params["result"] == "connected", result.params
        return str(conn["id"])

    return make


@pytest.fixture
def linked_company(
    emulator: httpx.AsyncClient, linked: Callable[..., Awaitable[str]]
) -> Callable[[int], Awaitable[tuple[str, str]]]:
    """A connection to a new QuickBooks company of its own, linked by that company's own admin
    (both made through the emulator's control API); returns (connection id, realm id)."""

    async def make(index: int) -> tuple[str, str]:
        company = await emulator.post("/companies", json={"name": f"Recycler {index}"})
        assert company.status_code == 201, company.text
        realm = company.json()["realm_id"]
        email = f"owner{index}@recycler.example.com"
        user = await emulator.post(
            "/users",
            json={
                "email": email,
                "given_name": "Owner",
                "family_name": str(index),
                "companies": {realm: "company_admin"},
            },
        )
        assert user.status_code == 201, user.text
        return await linked(email=email, realm_id=realm), realm

    return make


@pytest.fixture
async def runtime(stack: Stack) -> AsyncIterator[Any]:
    """The broker's runtime objects, for driving background work directly in a test."""
    from service.runtime import build_runtime

    async with build_runtime(stack.settings, database_url=stack.database_url, change_feed=False) as built:
        yield built
