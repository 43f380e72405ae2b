"""A real browser (Debian's Chromium driven by Playwright) against real servers: two brokers
(replicas on the shared test database) serving the reference Integration page, as `qbo-broker
dev` does, and an Intuit emulator of their own."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright

from service.auth.jwt import issue_dev_token
from service.emulator import EmulatorSettings
from service.emulator import create_app as create_emulator
from service.integration_page import PAGE_PATH, install_integration_page
from service.main import create_app
from tests.conftest import CLIENT_ID, CLIENT_SECRET, JWT_SECRET, TENANT, Stack, broker_settings
from tests.support.servers import ThreadedServer, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
# Short enough that a page which never comes fails the test quickly, long enough for 2 cores.
ACTION_TIMEOUT_MS = 10_000


@dataclass
class BrowserStack:
    broker_url: str  # replica A: the one Intuit redirects back to
    replica_url: str  # replica B, on the same database
    emulator_url: str  # as the browser sees Intuit
    emulator_api_url: str  # as the broker and the tests reach it

    def integration_page(self, user: str = "user-1", *, on: str | None = None) -> str:
        """The reference Integration page of `on` (replica A by default), signed in as `user`."""
        return f"{on or self.broker_url}{PAGE_PATH}?{urlencode({'user': user})}"


def broker_with_page(settings_port: int, database_url: str, emulator_api_url: str) -> FastAPI:
    """A broker serving the reference page as `qbo-broker dev` does, its JWTs for TENANT's
    users; the page's own origin is its return-URL allowlist (and so its CORS origin)."""
    origin = f"http://127.0.0.1:{settings_port}"
    app = create_app(
        broker_settings(database_url, settings_port, emulator_api_url, BROKER_RETURN_URL_ALLOWLIST=origin)
    )
    install_integration_page(
        app, lambda user: issue_dev_token(JWT_SECRET, tenant_id=TENANT, user_id=user), default_user="user-1"
    )
    return app


@pytest.fixture(scope="module")
def browser_stack(stack: Stack) -> Iterator[BrowserStack]:
    """Two brokers on the test database, and an emulator whose only redirect URI is replica
    A's callback. Same database as `stack`, so the per-test truncation covers them."""
    broker_port, replica_port, emulator_port = free_port(), free_port(), free_port()
    emulator_api_url = f"http://127.0.0.1:{emulator_port}"
    # The browser reaches Intuit under another host name, so Intuit's session cookie stays
    # Intuit's, as it would across real sites.
    emulator_public_url = f"http://localhost:{emulator_port}"
    emulator = ThreadedServer(
        create_emulator(
            EmulatorSettings(
                public_url=emulator_public_url,
                internal_url=emulator_api_url,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                redirect_uris=[f"http://127.0.0.1:{broker_port}/callback"],
            )
        ),
        emulator_port,
    ).start()
    broker = ThreadedServer(
        broker_with_page(broker_port, stack.database_url, emulator_api_url), broker_port
    ).start()
    replica = ThreadedServer(
        broker_with_page(replica_port, stack.database_url, emulator_api_url), replica_port
    ).start()
    yield BrowserStack(broker.url, replica.url, emulator_public_url, emulator_api_url)
    replica.stop()
    broker.stop()
    emulator.stop()


@pytest.fixture
async def broker(browser_stack: BrowserStack, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The API of the browser tests' broker, on a freshly seeded emulator."""
    async with httpx.AsyncClient(base_url=browser_stack.emulator_api_url, timeout=10) as emu:
        (await emu.post("/_emulator/reset")).raise_for_status()
    async with httpx.AsyncClient(base_url=browser_stack.broker_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def chromium() -> Path:
    # Never a skip: a missing browser must fail CI loudly rather than pass it untested.
    if not CHROMIUM.exists():
        pytest.fail(
            f"The browser tests need Debian's Chromium at {CHROMIUM}: "
            "apt-get install -y chromium (.ci/run installs it when missing)."
        )
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


class Camera:
    """Numbered full-page screenshots of one test, in test-artifacts/screenshots/<test>/."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.page, self.folder, self.count = page, folder, 0

    async def shot(self, step: str, of: Page | None = None) -> Path:
        """A screenshot of the test's page, or of another tab (`of`)."""
        self.count += 1
        path = self.folder / f"{self.count:02d}-{step}.png"
        await (of or self.page).screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser profile (no cookies) per test."""
    context = await browser.new_context(viewport={"width": 1024, "height": 768})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    opened = await context.new_page()
    yield opened
    await context.close()


@pytest.fixture
def camera(page: Page, request: pytest.FixtureRequest) -> Camera:
    folder = SCREENSHOTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)  # no stale steps from an earlier run
    folder.mkdir(parents=True)
    return Camera(page, folder)
