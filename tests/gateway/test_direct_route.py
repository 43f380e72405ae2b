"""The gateway's direct route (service.core.routing) answers every call as the documented FastAPI
route does, for every caller, method and target, and declines every form it does not serve."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from service.gateway.router import PATH, direct_routes
from tests.conftest import user_headers
from tests.gateway.test_gateway import QB_SCOPES
from tests.test_direct_routes import _scope, direct_answers

# Headers that differ between any two answers (Intuit's transaction id among them).
PER_RESPONSE = {"x-request-id", "date", "intuit_tid"}
CID = "0b8f3a52-51a1-4f64-9a8c-3d0f2f6a1e01"


def comparable(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], Any]:
    """Status, headers in the order sent (but those that differ every time), and body (Intuit's
    JSON without the `time` it stamps on every answer)."""
    headers = [(k, v) for k, v in response.headers.raw if k.decode().lower() not in PER_RESPONSE]
    body: Any = response.content
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict):
            body.pop("time", None)
    return response.status_code, headers, body


def test_the_direct_route_takes_only_the_plain_forms() -> None:
    (route,) = direct_routes
    base = f"/connections/{CID}/quickbooks"
    taken = [
        _scope(f"{base}/customer/1"),
        _scope(f"{base}/query", b"query=select%20*%20from%20Customer"),
        _scope(f"{base}/"),
        *(_scope(f"{base}/invoice", method=method) for method in ("POST", "PUT", "PATCH", "DELETE")),
    ]
    declined = [
        _scope(f"{base}/customer/1", method="HEAD"),
        _scope(f"{base}/customer/1", method="OPTIONS"),
        _scope(f"/connections/{CID.upper()}/quickbooks/customer/1"),
        _scope(f"/connections/{CID.replace('-', '')}/quickbooks/customer/1"),
        _scope("/connections/not-a-uuid/quickbooks/customer/1"),
        _scope(base),
        _scope(f"/connections/{CID}/token"),
        _scope(f"/connections/{CID}/quickbookz/customer/1"),
        _scope(f"/x/connections/{CID}/quickbooks/customer/1"),
        {**_scope(f"{base}/customer/1"), "root_path": "/broker"},
    ]
    for scope in taken:
        assert route.matches(scope)[0].name == "FULL", scope
    for scope in declined:
        assert route.matches(scope)[0].name == "NONE", scope


@pytest.fixture
async def callers(service_headers: Callable[..., Awaitable[dict[str, str]]]) -> dict[str, dict[str, str]]:
    both = await service_headers(*QB_SCOPES, name="qb-both")
    return {
        "nobody": {},
        "reader": await service_headers("quickbooks:read", name="qb-reader"),
        "writer": await service_headers("quickbooks:write", name="qb-writer"),
        "both": both,
        "tokens key": await service_headers("tokens:read", name="qb-tokens"),
        "user": user_headers(),
        "user of another tenant": user_headers("tenant-b", "user-2"),
        "unknown key": {"X-API-Key": "qbo_unknown_" + "z" * 40},
        "oversized key": {"X-API-Key": "k" * 300},
        "key and bearer": {**both, "Authorization": "Bearer not-for-intuit"},
    }


async def test_every_call_is_answered_as_the_documented_route_does(
    client: httpx.AsyncClient,
    linked: Callable[..., Awaitable[str]],
    callers: dict[str, dict[str, str]],
) -> None:
    """Each caller, method and target through the direct route (the canonical connection id) and
    through the FastAPI route (the same id in capitals, which the direct route declines): status,
    headers and body alike. A write names its own requestid, so the second one is answered by
    Intuit with the first one's answer and the two can be compared."""
    connected = await linked()
    unknown = "6f1c1c3e-8d2e-4a55-b7b0-6d1f8e1e0c99"
    targets: list[tuple[str, str, str, dict[str, Any]]] = [
        ("GET", connected, "customer/1", {}),
        ("GET", connected, "query", {"params": {"query": "select * from Customer where Id = '1'"}}),
        ("GET", connected, "customer/999999", {}),
        ("GET", unknown, "customer/1", {}),
        ("POST", connected, "customer", {"json": {"DisplayName": "Direct & Co"}}),
        (
            "POST",
            connected,
            "customer",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        ),
        ("DELETE", unknown, "invoice", {}),
    ]
    statuses = set()
    direct_before = await direct_answers(client, PATH)
    for n, ((name, headers), (method, cid, path, kwargs)) in enumerate(
        itertools.product(callers.items(), targets)
    ):
        extra = dict(kwargs)
        params = dict(extra.pop("params", {}))
        if method != "GET":
            params["requestid"] = f"direct-route-{n}"
        call_headers = {**headers, **extra.pop("headers", {})}
        answers = []
        for form in (cid, cid.upper()):  # the direct route first: Intuit's first answer is its own
            answers.append(
                await client.request(
                    method,
                    f"/connections/{form}/quickbooks/{path}",
                    params=params,
                    headers=call_headers,
                    **extra,
                )
            )
        by_route, by_app = answers
        assert comparable(by_route) == comparable(by_app), (name, method, path, by_route.text)
        statuses.add(by_route.status_code)
    # Every pair's first call went by the direct route, and no second one did.
    assert await direct_answers(client, PATH) == direct_before + len(callers) * len(targets)
    # Successes, Intuit's own refusals and each of the broker's were compared.
    assert {200, 400, 401, 403, 404} <= statuses, statuses


async def test_the_direct_route_is_counted_under_the_documented_route(
    client: httpx.AsyncClient, linked: Callable[..., Awaitable[str]], callers: dict[str, dict[str, str]]
) -> None:
    connected = await linked()
    label = f'qbo_broker_http_requests_total{{method="GET",route="{PATH}",status="200"}}'

    async def served() -> float:
        for line in (await client.get("/metrics")).text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == label:
                return float(value)
        return 0.0

    before = await served()
    response = await client.get(f"/connections/{connected}/quickbooks/customer/1", headers=callers["reader"])
    assert response.status_code == 200, response.text
    assert await served() == before + 1
