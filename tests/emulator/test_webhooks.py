"""The emulator's webhooks: a change of the books reaches the endpoint set on the control API,
signed with the verifier token, batched, in either format or both, retried, sometimes twice,
and never holding up the API answer. Over real HTTP: the emulator and a receiver each serve on
a socket of their own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.emulator import EmulatorSettings, create_app
from tests.support.servers import ThreadedServer, free_port
from tests.support.waiting import until

SANDBOX = "9341452988354102"
TOKEN = "emulator-verifier-token"
Emu = Any  # tests/emulator/conftest.py's driver


@dataclass
class Receiver:
    """An endpoint that records what it is sent; answers `statuses` in turn, then 200."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def bodies(self) -> list[Any]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    state.gate.set()

    async def endpoint(request: Request) -> Response:
        await asyncio.to_thread(state.gate.wait, 30)
        state.received.append((dict(request.headers), await request.body()))
        return Response(status_code=state.statuses.pop(0) if state.statuses else 200)

    port = free_port()
    server = ThreadedServer(Starlette(routes=[Route("/hook", endpoint, methods=["POST"])]), port).start()
    state.url = f"{server.url}/hook"
    yield state
    state.gate.set()
    server.stop()


@pytest.fixture
def emulator_url(settings_for: Any) -> Iterator[str]:
    port = free_port()
    settings: EmulatorSettings = settings_for(
        public_url=f"http://127.0.0.1:{port}",
        throttle_concurrent=0,
        throttle_per_second=0,
        throttle_per_minute=0,
    )
    server = ThreadedServer(create_app(settings), port).start()
    yield server.url
    server.stop()


@pytest.fixture
async def http(emulator_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator_url, timeout=30) as client:
        yield client


@pytest.fixture
async def token(http: httpx.AsyncClient, emu_for: Any) -> str:
    tokens = await emu_for(http).tokens("bob@example.com")
    return str(tokens["access_token"])


async def hook(http: httpx.AsyncClient, **values: Any) -> dict[str, Any]:
    response = await http.post("/_emulator/webhooks", json=values)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def create_customer(http: httpx.AsyncClient, token: str, name: str) -> str:
    response = await http.post(
        f"/v3/company/{SANDBOX}/customer",
        json={"DisplayName": name},
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["Customer"]["Id"])


def signed_by(token: str, headers: dict[str, str], body: bytes) -> bool:
    expected = base64.b64encode(hmac.new(token.encode(), body, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(headers["intuit-signature"], expected)


async def test_changes_of_one_window_arrive_in_one_signed_legacy_notification(
    http: httpx.AsyncClient, token: str, receiver: Receiver
) -> None:
    view = await hook(http, url=receiver.url, verifier_token=TOKEN, format="legacy", batch_window_s=0.3)
    assert view["verifier_token_set"] is True and "verifier_token" not in view
    first = await create_customer(http, token, "Metro Scrap")
    second = await create_customer(http, token, "Harbor Metals")
    await until(lambda: _received(receiver, 1), "the notification")
    await asyncio.sleep(0.5)  # nothing else follows for that window
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert signed_by(TOKEN, headers, body) and not signed_by("another-token", headers, body)
    notification = json.loads(body)["eventNotifications"]
    assert [n["realmId"] for n in notification] == [SANDBOX]
    entities = notification[0]["dataChangeEvent"]["entities"]
    assert [(e["name"], e["id"], e["operation"]) for e in entities] == [
        ("Customer", first, "Create"),
        ("Customer", second, "Create"),
    ]
    assert all(e["lastUpdated"].endswith("Z") for e in entities)


async def test_cloudevents_carry_one_event_per_change(
    http: httpx.AsyncClient, token: str, receiver: Receiver
) -> None:
    await hook(http, url=receiver.url, verifier_token=TOKEN, format="cloudevents", batch_window_s=0.05)
    created = await create_customer(http, token, "Metro Scrap")
    await until(lambda: _received(receiver, 1), "the notification")
    headers, body = receiver.received[0]
    assert signed_by(TOKEN, headers, body)
    [event] = json.loads(body)
    assert event["specversion"] == "1.0" and event["type"] == "qbo.customer.created.v1"
    assert event["intuitentityid"] == created and event["intuitaccountid"] == SANDBOX
    assert event["id"] and event["source"].startswith("intuit.") and event["time"].endswith("Z")


async def test_both_formats_and_repeats(http: httpx.AsyncClient, token: str, receiver: Receiver) -> None:
    await hook(
        http,
        url=receiver.url,
        verifier_token=TOKEN,
        format="both",
        batch_window_s=0.05,
        duplicate_probability=1,
    )
    await create_customer(http, token, "Metro Scrap")
    await until(lambda: _received(receiver, 4), "two formats, each twice")
    bodies = [body for _, body in receiver.received]
    assert bodies[0] == bodies[1] and bodies[2] == bodies[3]  # a repeat is the same POST
    assert "eventNotifications" in json.loads(bodies[0])
    assert isinstance(json.loads(bodies[2]), list)
    deliveries = (await http.get("/_emulator/webhooks/deliveries")).json()
    assert [(d["format"], d["repeat"], d["status"]) for d in deliveries] == [
        ("legacy", False, 200),
        ("legacy", True, 200),
        ("cloudevents", False, 200),
        ("cloudevents", True, 200),
    ]


async def test_a_failed_delivery_is_retried(http: httpx.AsyncClient, token: str, receiver: Receiver) -> None:
    receiver.statuses = [503]
    await hook(http, url=receiver.url, verifier_token=TOKEN, batch_window_s=0.05, retry_delay_s=0.05)
    await create_customer(http, token, "Metro Scrap")
    await until(lambda: _received(receiver, 2), "the retry")
    assert receiver.received[0][1] == receiver.received[1][1]
    deliveries = (await http.get("/_emulator/webhooks/deliveries")).json()
    assert [(d["attempt"], d["status"]) for d in deliveries] == [(1, 503), (2, 200)]


async def test_the_api_answers_while_the_endpoint_is_still_busy(
    http: httpx.AsyncClient, token: str, receiver: Receiver
) -> None:
    receiver.gate.clear()  # the endpoint holds every delivery until released
    await hook(http, url=receiver.url, verifier_token=TOKEN, batch_window_s=0)
    await create_customer(http, token, "Metro Scrap")
    await create_customer(http, token, "Harbor Metals")  # answered with a delivery in flight
    assert receiver.received == []
    receiver.gate.set()
    await until(lambda: _received(receiver, 1), "the held delivery")


async def test_no_url_sends_nothing_and_reset_forgets_the_endpoint(
    http: httpx.AsyncClient, token: str, receiver: Receiver
) -> None:
    await hook(http, url=receiver.url, verifier_token=TOKEN, batch_window_s=0)
    assert (await hook(http, url=None))["url"] is None
    await create_customer(http, token, "Metro Scrap")
    assert (await http.post("/_emulator/reset")).status_code == 200
    assert (await http.get("/_emulator/webhooks")).json()["url"] is None
    await asyncio.sleep(0.3)
    assert receiver.received == []
    refused = await http.post("/_emulator/webhooks", json={"url": "ftp://example"})
    assert refused.status_code == 422


async def _received(receiver: Receiver, count: int) -> bool:
    return len(receiver.received) >= count
