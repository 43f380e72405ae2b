"""The Connect flow in a real browser, clicked through as a person would, on the reference
Integration page (/dev/integration, as `qbo-broker dev` serves it): Connect to QuickBooks →
Intuit's sign-in, company and consent pages → the broker's callback → back on the page, which
redeems the completion ticket; then modules, "Connect anyway", Disconnect, and the link icon
following every change live through the status stream, on either replica. Screenshots of every
step go to test-artifacts/screenshots/<test name>/."""

from __future__ import annotations

from typing import Any

import httpx
from playwright.async_api import Page, expect

from service.emulator.config import SEED_USERS
from tests.conftest import ALICE, BOB, CAROL, COMPANY_1, user_headers
from tests.e2e.conftest import BrowserStack, Camera

SUB = {user["email"]: user["sub"] for user in SEED_USERS}


async def the_connection(broker: httpx.AsyncClient) -> dict[str, Any]:
    """The tenant's one connection, as the API shows it."""
    response = await broker.get("/connections", headers=user_headers())
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert len(items) == 1, items
    return dict(items[0])


async def open_page(page: Page, stack: BrowserStack, user: str = "user-1", *, on: str | None = None) -> None:
    """The Integration page, once its status stream is live."""
    await page.goto(stack.integration_page(user, on=on))
    await expect(page.locator("#stream")).to_have_attribute("data-state", "live")


async def click_connect(page: Page, camera: Camera, stack: BrowserStack) -> None:
    """Connect to QuickBooks: the browser lands on Intuit."""
    await camera.shot("cietrade-integration", of=page)
    await page.click("#connect")
    await page.wait_for_url(f"{stack.emulator_url}/connect/oauth2/flow/*")


async def sign_in(page: Page, camera: Camera, email: str) -> None:
    await expect(page.locator(f"#signin-{SUB[email]}")).to_be_visible()
    await camera.shot("intuit-signin", of=page)
    await page.click(f"#signin-{SUB[email]}")
    await expect(page.locator("#signed-in-user")).to_contain_text(email)


async def choose_company_and_connect(page: Page, camera: Camera, realm_id: str = COMPANY_1) -> None:
    await expect(page.locator(f"#company-{realm_id}")).to_be_visible()
    await camera.shot("intuit-choose-company", of=page)
    await page.click(f"#company-{realm_id}")
    await expect(page.locator("#connect")).to_be_visible()
    await camera.shot("intuit-consent", of=page)
    await page.click("#connect")


async def back_on_the_page(
    page: Page, camera: Camera, stack: BrowserStack, step: str, on: str | None = None
) -> None:
    """Back on the Integration page, which has taken the completion ticket out of the address."""
    await page.wait_for_url(f"{on or stack.broker_url}/dev/integration?user=*")
    await expect(page.locator("#message")).not_to_be_empty()
    assert "completion_ticket" not in page.url
    await camera.shot(f"cietrade-returned-{step}", of=page)


async def connect_as_alice(page: Page, camera: Camera, stack: BrowserStack) -> None:
    await open_page(page, stack)
    await click_connect(page, camera, stack)
    await sign_in(page, camera, ALICE)
    await choose_company_and_connect(page, camera)  # Alice administers two companies
    await back_on_the_page(page, camera, stack, "connected")
    await expect(page.locator("#message")).to_have_text("QuickBooks is linked.")
    await expect(page.locator("#status")).to_have_text("connected")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "connected")


async def test_connect_from_the_page_links_alice_and_lights_the_icon(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    # No connection yet: the page creates one when the user clicks Connect.
    await connect_as_alice(page, camera, browser_stack)
    await expect(page.locator("#company")).to_have_text("Sandbox Company_US_1")
    await expect(page.locator("#owner")).to_have_text(ALICE)
    body = await the_connection(broker)
    assert body["status"] == "connected"
    assert body["realm_id"] == COMPANY_1
    assert body["owner"]["user_id"] == "user-1"
    assert body["pending_link"] is None and body["last_error"] is None

    # Turning a module on enables the accounting link: the icon goes green.
    await page.check("#module-ar")
    await page.click("#save")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "enabled")
    await expect(page.locator("#accounting-link")).to_have_text("enabled")
    await camera.shot("cietrade-module-saved")
    modules = (await the_connection(broker))["modules"]
    assert modules == {"accounts_receivable": True, "accounts_payable": False}

    await page.click("#disconnect")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "off")
    await expect(page.locator("#status")).to_have_text("disconnected")
    await expect(page.locator("#connect")).to_have_text("Connect to QuickBooks")
    await camera.shot("cietrade-disconnected")
    assert (await the_connection(broker))["status"] == "disconnected"


async def test_the_icon_follows_a_connect_finished_in_another_tab_without_polling(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    """One tab shows the page; the user connects in a second tab. The first tab learns it from
    the stream: it asks the broker nothing until an event arrives."""
    await open_page(page, browser_stack)
    await camera.shot("first-tab-before")
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))

    second = await page.context.new_page()
    await connect_as_alice(second, camera, browser_stack)
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#company")).to_have_text("Sandbox Company_US_1")
    await camera.shot("first-tab-connected-live")

    await second.check("#module-ap")
    await second.click("#save")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "enabled")
    await expect(page.locator("#module-ap")).to_be_checked()
    await camera.shot("first-tab-enabled-live")
    # The first tab asked only when an event told it something changed: reads of the
    # connection (the list, while it had none), never a look at /status.
    connection_id = (await the_connection(broker))["id"]
    assert asked, "the first tab never re-read the connection"
    assert all("/connections" in url and "/status" not in url for url in asked), asked
    assert any(url.endswith(f"/connections/{connection_id}") for url in asked), asked


async def test_a_page_on_one_replica_sees_changes_made_through_the_other(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    """The page's stream is on replica B; Connect, Save and Disconnect go through replica A."""
    await open_page(page, browser_stack, on=browser_stack.replica_url)
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "off")
    await camera.shot("replica-b-before")

    on_a = await page.context.new_page()
    await connect_as_alice(on_a, camera, browser_stack)
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "connected")
    await camera.shot("replica-b-connected-live")

    await on_a.check("#module-ar")
    await on_a.click("#save")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "enabled")
    await camera.shot("replica-b-enabled-live")

    await on_a.click("#disconnect")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "off")
    await expect(page.locator("#status")).to_have_text("disconnected")
    await camera.shot("replica-b-disconnected-live")


async def colleague_connects_anyway_as_bob(page: Page, camera: Camera, stack: BrowserStack) -> None:
    """A colleague reconnects in the same browser, where Intuit still remembers Alice; as Bob,
    on Intuit's Switch Admin page, Connect anyway: back on the page, a pending link."""
    await open_page(page, stack, user="user-2")
    await click_connect(page, camera, stack)
    await expect(page.locator("#signed-in-user")).to_contain_text(ALICE)
    await camera.shot("intuit-remembers-alice", of=page)
    await page.click("#not-you")
    await sign_in(page, camera, BOB)
    # Bob administers one company, so Intuit skips the chooser; Alice's live connection makes
    # this Intuit's Switch Admin page.
    await expect(page.locator("#switch-admin")).to_contain_text(ALICE)
    await camera.shot("intuit-switch-admin", of=page)
    await page.click("#connect-anyway")
    await back_on_the_page(page, camera, stack, "confirmation-required")
    await expect(page.locator("#pending")).to_be_visible()
    await expect(page.locator("#pending-text")).to_contain_text(BOB)
    await expect(page.locator("#pending-text")).to_contain_text("different_quickbooks_user")


async def test_second_admin_connects_anyway_then_confirms_on_the_page(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    await connect_as_alice(page, camera, browser_stack)
    await colleague_connects_anyway_as_bob(page, camera, browser_stack)

    pending = await the_connection(broker)
    assert pending["owner"]["quickbooks_user"]["email"] == ALICE  # unchanged until confirmed
    assert pending["pending_link"]["quickbooks_user"]["email"] == BOB
    assert pending["pending_link"]["reasons"] == ["different_quickbooks_user"]

    await page.click("#confirm")
    await expect(page.locator("#pending")).to_be_hidden()
    await expect(page.locator("#owner")).to_have_text(BOB)
    await camera.shot("cietrade-confirmed")
    body = await the_connection(broker)
    assert body["status"] == "connected"
    assert body["pending_link"] is None
    assert body["owner"]["user_id"] == "user-2"
    assert body["owner"]["quickbooks_user"]["email"] == BOB


async def test_second_admin_connects_anyway_then_declines_on_the_page(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    await connect_as_alice(page, camera, browser_stack)
    await colleague_connects_anyway_as_bob(page, camera, browser_stack)

    await page.click("#decline")
    await expect(page.locator("#pending")).to_be_hidden()
    # Intuit keeps one grant per app and company: Bob's Connect anyway retired Alice's there,
    # so declining leaves a link that must be connected again, and the page says why.
    await expect(page.locator("#status")).to_have_text("reauthorization_required")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "off")
    await expect(page.locator("#last-error")).to_contain_text("Connect again")
    await camera.shot("cietrade-declined")
    body = await the_connection(broker)
    assert body["pending_link"] is None
    assert body["owner"]["quickbooks_user"]["email"] == ALICE
    assert body["last_error"]["code"] == "quickbooks_connection_revoked"


async def test_not_you_switches_to_another_quickbooks_user(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    await open_page(page, browser_stack)
    await click_connect(page, camera, browser_stack)
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
    await back_on_the_page(page, camera, browser_stack, "connected")
    await expect(page.locator("#owner")).to_have_text(ALICE)

    body = await the_connection(broker)
    assert body["status"] == "connected"
    assert body["owner"]["quickbooks_user"]["email"] == ALICE
    assert body["owner"]["quickbooks_user"]["sub"] == SUB[ALICE]


async def test_non_admin_is_refused_and_returns_with_access_denied(
    page: Page, camera: Camera, browser_stack: BrowserStack, broker: httpx.AsyncClient
) -> None:
    await open_page(page, browser_stack)
    await click_connect(page, camera, browser_stack)
    await sign_in(page, camera, CAROL)
    refusal = page.locator("#not-admin")
    await expect(refusal).to_contain_text("Master admin or Company admin")
    await expect(page.locator("#connect")).to_have_count(0)  # nothing to authorize here
    await camera.shot("intuit-admin-required")
    await page.click("#back-to-app")
    await back_on_the_page(page, camera, browser_stack, "error")
    await expect(page.locator("#message")).to_contain_text("quickbooks_access_denied")
    await expect(page.locator("#link-icon")).to_have_attribute("data-state", "off")

    body = await the_connection(broker)
    assert body["status"] != "connected"
    assert body["owner"] is None
    assert body["last_error"]["code"] == "quickbooks_access_denied"
