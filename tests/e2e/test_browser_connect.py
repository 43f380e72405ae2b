"""The Connect flow in a real browser, clicked through as a person would: cieTrade's
Integration page → Intuit's sign-in, company and consent pages → the broker's callback → back
on cieTrade's page with the result. Screenshots of every step go to
test-artifacts/screenshots/<test name>/."""

from __future__ import annotations

from typing import Any

import httpx
from playwright.async_api import Page, expect

from service.emulator.config import SEED_USERS
from tests.conftest import ALICE, BOB, CAROL, COMPANY_1, user_headers
from tests.e2e.conftest import BrowserStack, Camera

SUB = {user["email"]: user["sub"] for user in SEED_USERS}


async def new_connection(broker: httpx.AsyncClient, user: str = "user-1") -> str:
    response = await broker.post("/connections", json={}, headers=user_headers(user=user))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def get_connection(broker: httpx.AsyncClient, connection_id: str) -> dict[str, Any]:
    response = await broker.get(f"/connections/{connection_id}", headers=user_headers())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def open_integration_page(page: Page, camera: Camera, stack: BrowserStack,
                                connection_id: str, user: str = "user-1") -> None:
    """On cieTrade's Integration page, click Connect: the browser lands on Intuit."""
    await page.goto(stack.integration_page(connection_id, user))
    await camera.shot("cietrade-integration")
    await page.click("#connect-quickbooks")
    await page.wait_for_url(f"{stack.emulator_url}/connect/oauth2/flow/*")


async def sign_in(page: Page, camera: Camera, email: str) -> None:
    await expect(page.locator(f"#signin-{SUB[email]}")).to_be_visible()
    await camera.shot("intuit-signin")
    await page.click(f"#signin-{SUB[email]}")
    await expect(page.locator("#signed-in-user")).to_contain_text(email)


async def choose_company_and_connect(page: Page, camera: Camera, realm_id: str = COMPANY_1) -> None:
    await expect(page.locator(f"#company-{realm_id}")).to_be_visible()
    await camera.shot("intuit-choose-company")
    await page.click(f"#company-{realm_id}")
    await expect(page.locator("#connect")).to_be_visible()
    await camera.shot("intuit-consent")
    await page.click("#connect")


async def expect_returned(page: Page, camera: Camera, stack: BrowserStack, connection_id: str,
                          result: str, error: str = "") -> None:
    """Back on cieTrade's page, which shows the outcome (after it redeemed the completion ticket)."""
    await page.wait_for_url(f"{stack.frontend_url}/integrations/quickbooks?*result=*")
    await expect(page.locator("#result")).to_have_text(result)
    await expect(page.locator("#connection-id")).to_have_text(connection_id)
    await expect(page.locator("#error")).to_have_text(error)
    await camera.shot(f"cietrade-returned-{result}")


async def connect_as_alice(page: Page, camera: Camera, stack: BrowserStack, broker: httpx.AsyncClient,
                           connection_id: str) -> None:
    await open_integration_page(page, camera, stack, connection_id)
    await sign_in(page, camera, ALICE)
    await choose_company_and_connect(page, camera)  # Alice administers two companies
    await expect_returned(page, camera, stack, connection_id, "connected")
    body = await get_connection(broker, connection_id)
    assert body["status"] == "connected"
    assert body["realm_id"] == COMPANY_1
    assert body["owner"]["user_id"] == "user-1"
    assert body["owner"]["quickbooks_user"]["email"] == ALICE


async def test_connect_signs_in_chooses_company_and_returns_connected(
        page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient) -> None:
    connection_id = await new_connection(broker)
    await connect_as_alice(page, camera, browser_stack, broker, connection_id)
    body = await get_connection(broker, connection_id)
    assert body["company_name"] == "Sandbox Company_US_1"
    assert body["pending_link"] is None
    assert body["last_error"] is None


async def test_second_admin_connects_anyway_then_confirms_in_cietrade(
        page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient) -> None:
    connection_id = await new_connection(broker)
    await connect_as_alice(page, camera, browser_stack, broker, connection_id)

    # A colleague reconnects in the same browser: Intuit still remembers Alice.
    await open_integration_page(page, camera, browser_stack, connection_id, user="user-2")
    await expect(page.locator("#signed-in-user")).to_contain_text(ALICE)
    await camera.shot("intuit-remembers-alice")
    await page.click("#not-you")
    await sign_in(page, camera, BOB)
    # Bob administers one company, so Intuit skips the chooser; Alice's live connection makes
    # this Intuit's Switch Admin page.
    await expect(page.locator("#switch-admin")).to_contain_text(ALICE)
    await camera.shot("intuit-switch-admin")
    await page.click("#connect-anyway")
    await expect_returned(page, camera, browser_stack, connection_id, "confirmation_required")

    pending = await get_connection(broker, connection_id)
    assert pending["owner"]["quickbooks_user"]["email"] == ALICE  # unchanged until confirmed
    assert pending["pending_link"]["quickbooks_user"]["email"] == BOB
    assert pending["pending_link"]["reasons"] == ["different_quickbooks_user"]

    confirmed = await broker.post(f"/connections/{connection_id}/pending-link/confirm",
                                  headers=user_headers(user="user-2"))
    assert confirmed.status_code == 200, confirmed.text
    body = confirmed.json()
    assert body["status"] == "connected"
    assert body["pending_link"] is None
    assert body["owner"]["user_id"] == "user-2"
    assert body["owner"]["quickbooks_user"]["email"] == BOB
    assert (await get_connection(broker, connection_id))["owner"]["quickbooks_user"]["email"] == BOB


async def test_not_you_switches_to_another_quickbooks_user(
        page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient) -> None:
    connection_id = await new_connection(broker)
    await open_integration_page(page, camera, browser_stack, connection_id)
    await sign_in(page, camera, CAROL)
    # Carol's one company is chosen for her; she is not an admin of it.
    await expect(page.locator("#not-admin")).to_be_visible()
    await camera.shot("intuit-signed-in-as-carol")
    await page.click("#not-you")

    # Signed out: the sign-in page again, where Alice types her email this time.
    await expect(page.locator("#signin-submit")).to_be_visible()
    await expect(page.locator("#signed-in-user")).to_have_count(0)
    await page.fill("#email", ALICE)
    await camera.shot("intuit-signin-by-email")
    await page.click("#signin-submit")
    await expect(page.locator("#signed-in-user")).to_contain_text(ALICE)
    await choose_company_and_connect(page, camera)
    await expect_returned(page, camera, browser_stack, connection_id, "connected")

    body = await get_connection(broker, connection_id)
    assert body["status"] == "connected"
    assert body["owner"]["quickbooks_user"]["email"] == ALICE
    assert body["owner"]["quickbooks_user"]["sub"] == SUB[ALICE]


async def test_non_admin_is_refused_and_returns_with_access_denied(
        page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient) -> None:
    connection_id = await new_connection(broker)
    await open_integration_page(page, camera, browser_stack, connection_id)
    await sign_in(page, camera, CAROL)
    refusal = page.locator("#not-admin")
    await expect(refusal).to_contain_text("Master admin or Company admin")
    await expect(page.locator("#connect")).to_have_count(0)  # nothing to authorize here
    await camera.shot("intuit-admin-required")
    await page.click("#back-to-app")
    await expect_returned(page, camera, browser_stack, connection_id, "error",
                          error="quickbooks_access_denied")

    body = await get_connection(broker, connection_id)
    assert body["status"] != "connected"
    assert body["owner"] is None
    assert body["last_error"]["code"] == "quickbooks_access_denied"
