"""Swagger UI in a real browser that can reach the broker and nothing else, used as a developer
does after `qbo-broker dev`: Authorize with a user's JWT, create a connection and read the link
status with "Try it out" and "Execute", then Authorize with a service's API key and fetch a token.
Screenshots of every step go to test-artifacts/screenshots/<test name>/."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Locator, Page, Route, expect

from tests.conftest import COMPANY_1, TENANT, Stack, user_headers
from tests.e2e.conftest import Camera


async def only_the_broker(page: Page, broker_url: str) -> list[str]:
    """Abort every request to another host, as on a machine without internet access; returns
    the list of what was aborted (or failed), which a page that works offline leaves empty."""
    broker = urlsplit(broker_url).netloc
    refused: list[str] = []

    async def route(intercepted: Route) -> None:
        if urlsplit(intercepted.request.url).netloc == broker:
            await intercepted.continue_()
        else:
            refused.append(intercepted.request.url)
            await intercepted.abort("internetdisconnected")

    await page.context.route("**/*", route)
    page.on("requestfailed", lambda request: refused.append(f"failed: {request.url}"))
    return refused


async def authorize(page: Page, camera: Camera, scheme: str, value: str) -> None:
    """Authorize → the scheme's box → paste → Authorize → Close."""
    await page.locator("button.authorize").first.click()
    box = page.locator(".modal-ux .auth-container").filter(has_text=scheme)
    await expect(box).to_be_visible()
    await box.locator("input").fill(value)
    await camera.shot(f"authorize-{scheme}")
    # Swagger UI labels its Authorize and Logout buttons for screen readers.
    await box.get_by_role("button", name="Apply credentials").click()
    await expect(box.get_by_role("button", name="Remove authorization")).to_have_text("Logout")
    await page.locator(".modal-ux button.close-modal").click()
    await expect(page.locator(".modal-ux")).to_have_count(0)


def operation(page: Page, method: str, path: str) -> Locator:
    # /status is listed under two tags; either copy will do.
    return page.locator(
        f".opblock-{method.lower()}", has=page.locator(f'.opblock-summary-path[data-path="{path}"]')
    ).first


async def try_it_out(
    page: Page, camera: Camera, method: str, path: str, parameters: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Open the operation, Try it out, fill the parameters, Execute; returns the status code and
    the JSON body the page shows."""
    block = operation(page, method, path)
    await block.locator(".opblock-summary").click()
    await block.get_by_role("button", name="Try it out").click()
    for name, value in (parameters or {}).items():
        await block.locator(f'tr[data-param-name="{name}"] input').fill(value)
    await block.get_by_role("button", name="Execute").click()
    shown = block.locator(".live-responses-table .response")
    await expect(shown.locator(".response-col_status")).not_to_be_empty()
    await shown.scroll_into_view_if_needed()
    step = path.strip("/").replace("/", "-").replace("{", "").replace("}", "")
    await camera.shot(f"{method.lower()}-{step}")
    status = int((await shown.locator(".response-col_status").inner_text()).strip())
    body = await shown.locator(".response-col_description pre.microlight").first.inner_text()
    await block.locator(".opblock-summary").click()  # closed again, for the next screenshots
    return status, json.loads(body)


async def test_developer_uses_swagger_ui_offline(
    page: Page,
    camera: Camera,
    stack: Stack,
    linked: Callable[..., Awaitable[str]],
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> None:
    connected_id = await linked()  # through the emulator, as in the Connect tests
    api_key = (await service_headers("tokens:read", name="swagger"))["X-API-Key"]
    jwt = user_headers(TENANT, "user-1")["Authorization"].removeprefix("Bearer ")
    refused = await only_the_broker(page, stack.broker_url)

    await page.goto(f"{stack.broker_url}/docs")  # returns once the page and its assets loaded
    assert refused == [], f"the page needs more than the broker: {refused}"
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("qbo-broker")
    await expect(operation(page, "POST", "/connections")).to_be_visible()
    await camera.shot("docs")

    # Both schemes are offered.
    await page.locator("button.authorize").first.click()
    schemes = page.locator(".modal-ux .auth-container h4")
    await expect(schemes.filter(has_text="UserJWT")).to_be_visible()
    await expect(schemes.filter(has_text="ServiceAPIKey")).to_be_visible()
    await page.locator(".modal-ux button.close-modal").click()

    await authorize(page, camera, "UserJWT", jwt)
    status, created = await try_it_out(page, camera, "POST", "/connections")  # the example body: {}
    assert status == 201, created
    assert created["tenant_id"] == TENANT
    assert created["status"] == "pending"
    new_id = created["id"]

    status, link = await try_it_out(page, camera, "GET", "/status")
    assert status == 200, link
    assert link["tenant_id"] == TENANT
    by_id = {conn["id"]: conn for conn in link["connections"]}
    assert by_id[new_id]["status"] == "pending"
    assert by_id[connected_id]["status"] == "connected"

    await authorize(page, camera, "ServiceAPIKey", api_key)
    # What was pasted into Authorize survives a reload (persistAuthorization).
    await page.reload()
    await expect(page.locator("button.authorize.locked").first).to_be_visible()
    status, token = await try_it_out(
        page, camera, "GET", "/connections/{connection_id}/token", {"connection_id": connected_id}
    )
    assert status == 200, token  # the API key was sent: a user's JWT alone gets 403 here
    assert token["access_token"]
    assert token["token_type"] == "bearer"
    assert token["realm_id"] == COMPANY_1

    assert refused == [], f"the page reached beyond the broker: {refused}"
