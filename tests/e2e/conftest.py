"""A real browser (Debian's Chromium driven by Playwright) against real servers: a cieTrade
frontend page, a broker and an Intuit emulator of their own, on the shared test database."""

from __future__ import annotations

import html
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from service.emulator import EmulatorSettings
from service.emulator import create_app as create_emulator
from service.main import create_app
from tests.conftest import CLIENT_ID, CLIENT_SECRET, TENANT, Stack, broker_settings, user_headers
from tests.support.servers import ThreadedServer, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
INTEGRATION_PATH = "/integrations/quickbooks"
# Short enough that a page which never comes fails the test quickly, long enough for 2 cores.
ACTION_TIMEOUT_MS = 10_000


@dataclass
class BrowserStack:
    broker_url: str
    emulator_url: str  # as the browser sees Intuit
    emulator_api_url: str  # as the broker and the tests reach it
    frontend_url: str

    def integration_page(self, connection_id: str, user: str = "user-1") -> str:
        query = urlencode({"connection_id": connection_id, "user": user})
        return f"{self.frontend_url}{INTEGRATION_PATH}?{query}"


_PAGE_CSS = ("body{margin:0;font-family:system-ui,sans-serif;background:#f5f7fa;color:#1f2933}"
             "header{background:#0b3d6e;color:#fff;padding:14px 24px;font-weight:700;font-size:20px}"
             "main{max-width:560px;margin:40px auto;background:#fff;border-radius:8px;padding:28px;"
             "box-shadow:0 2px 8px rgba(0,0,0,.08)}dl{display:grid;grid-template-columns:auto 1fr;"
             "gap:6px 16px}dt{color:#52606d}dd{margin:0;font-family:monospace}"
             "button{font:inherit;font-weight:600;padding:10px 18px;border-radius:4px;border:none;"
             "background:#2CA01C;color:#fff;cursor:pointer}.problem{color:#c0392b}")


def frontend_app(broker_url: str, tenant: str) -> Starlette:
    """cieTrade's Integration page, reduced to what the Connect flow touches: a Connect button
    that asks the broker for Intuit's URL, and the return page showing what the broker sent back."""

    def page(request: Request, problem: str | None = None) -> HTMLResponse:
        params = request.query_params
        connection_id, user = params.get("connection_id", ""), params.get("user", "user-1")
        returned = "".join(
            f'<dt>{label}</dt><dd id="{key.replace("_", "-")}">{html.escape(params.get(key, ""))}</dd>'
            for key, label in (("connection_id", "Connection"), ("result", "Result"),
                               ("error", "Error")))
        problem_html = f'<p class="problem" id="problem">{html.escape(problem)}</p>' if problem else ""
        body = (
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cieTrade · QuickBooks"
            f"</title><style>{_PAGE_CSS}</style></head><body><header>cieTrade</header><main>"
            f"<h1>QuickBooks Online</h1>{problem_html}<dl>{returned}</dl>"
            f'<form method="post" action="{INTEGRATION_PATH}/connect">'
            f'<input type="hidden" name="connection_id" value="{html.escape(connection_id)}">'
            f'<input type="hidden" name="user" value="{html.escape(user)}">'
            '<button type="submit" id="connect-quickbooks">Connect to QuickBooks</button></form>'
            "</main></body></html>")
        return HTMLResponse(body, status_code=400 if problem else 200)

    async def integration(request: Request) -> Response:
        params = request.query_params
        ticket = params.get("completion_ticket")
        if params.get("result") != "completion_required" or not ticket:
            return page(request)
        # As cieTrade's backend does on its return URL: redeem the ticket with the signed-in
        # user's token, then show the outcome without the ticket in the address bar.
        connection_id, user = params.get("connection_id", ""), params.get("user", "user-1")
        async with httpx.AsyncClient(base_url=broker_url, timeout=10) as broker:
            answer = await broker.post(f"/connections/{connection_id}/complete",
                                       json={"completion_ticket": ticket},
                                       headers=user_headers(tenant, user))
        shown = {"user": user, "connection_id": connection_id}
        if answer.status_code == 200:
            shown["result"] = "confirmation_required" if answer.json()["pending_link"] else "connected"
        else:
            shown.update(result="error", error=answer.json().get("code", str(answer.status_code)))
        return RedirectResponse(f"{INTEGRATION_PATH}?{urlencode(shown)}", status_code=303)

    async def connect(request: Request) -> Response:
        # As cieTrade's backend does: the user's token stays server-side, the browser only
        # receives Intuit's URL.
        form = await request.form()
        connection_id, user = str(form.get("connection_id", "")), str(form.get("user", "user-1"))
        return_url = f"{request.base_url}{INTEGRATION_PATH.lstrip('/')}?{urlencode({'user': user})}"
        async with httpx.AsyncClient(base_url=broker_url, timeout=10) as broker:
            answer = await broker.post(f"/connections/{connection_id}/authorize",
                                       json={"return_url": return_url},
                                       headers=user_headers(tenant, user))
        if answer.status_code != 200:
            return page(request, problem=f"The broker answered {answer.status_code}: {answer.text}")
        return RedirectResponse(answer.json()["authorization_url"], status_code=303)

    return Starlette(routes=[Route(INTEGRATION_PATH, integration),
                             Route(f"{INTEGRATION_PATH}/connect", connect, methods=["POST"])])


@pytest.fixture(scope="module")
def browser_stack(stack: Stack) -> Iterator[BrowserStack]:
    """Its own broker, whose return-URL allowlist names the frontend, and its own emulator, whose
    only redirect URI is that broker's callback. Same database as `stack`, so the per-test
    truncation covers it."""
    broker_port, emulator_port, frontend_port = free_port(), free_port(), free_port()
    frontend_url = f"http://127.0.0.1:{frontend_port}"
    emulator_api_url = f"http://127.0.0.1:{emulator_port}"
    # The browser reaches Intuit under another host name, so Intuit's session cookie stays
    # Intuit's, as it would across real sites.
    emulator_public_url = f"http://localhost:{emulator_port}"
    settings = broker_settings(stack.database_url, broker_port, emulator_api_url,
                               BROKER_RETURN_URL_ALLOWLIST=frontend_url)
    emulator = ThreadedServer(create_emulator(EmulatorSettings(
        public_url=emulator_public_url, internal_url=emulator_api_url, client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET, redirect_uris=[settings.redirect_uri])), emulator_port).start()
    broker = ThreadedServer(create_app(settings), broker_port).start()
    frontend = ThreadedServer(frontend_app(broker.url, TENANT), frontend_port).start()
    yield BrowserStack(broker.url, emulator_public_url, emulator_api_url, frontend.url)
    frontend.stop()
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
        pytest.fail(f"The browser tests need Debian's Chromium at {CHROMIUM}: "
                    "apt-get install -y chromium (.ci/run installs it when missing).")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium),
                                                    args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


class Camera:
    """Numbered full-page screenshots of one test, in test-artifacts/screenshots/<test>/."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.page, self.folder, self.count = page, folder, 0

    async def shot(self, step: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
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
