"""The fast lane (service/fastlane.py) answers cached reads exactly as the app would, and leaves
everything else (errors above all) to the app."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from service.auth.jwt import issue_dev_token
from tests.conftest import JWT_SECRET, TENANT, Stack, user_headers
from tests.support.db_helpers import execute, expire_access_token

STATUS, TOKEN = "/status", "/connections/{connection_id}/token"
# Headers that differ between any two responses.
PER_RESPONSE = {"x-request-id", "date"}


async def sample(client: httpx.AsyncClient, name: str) -> float:
    """One sample of /metrics, named as the exposition writes it (0 when absent)."""
    for line in (await client.get("/metrics")).text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


async def fast_answers(client: httpx.AsyncClient, route: str) -> float:
    return await sample(client, f'qbo_broker_fast_lane_answers_total{{route="{route}"}}')


async def get_counted(client: httpx.AsyncClient, route: str, url: str,
                      **kwargs: Any) -> tuple[httpx.Response, bool]:
    """The response, and whether the fast lane gave it."""
    before = await fast_answers(client, route)
    response = await client.get(url, **kwargs)
    return response, await fast_answers(client, route) == before + 1


async def served(client: httpx.AsyncClient, route: str) -> float:
    """Requests counted as GET route answered 200."""
    return await sample(client, f'qbo_broker_http_requests_total{{method="GET",route="{route}",'
                                f'status="200"}}')


def comparable(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in PER_RESPONSE}
    return response.status_code, headers, response.content


@pytest.fixture
async def connected(new_connection, connect) -> dict[str, Any]:
    conn = await new_connection()
    result = await connect(conn["id"])
    assert result.params["result"] == "connected", result
    return conn


async def test_cached_answers_are_the_apps_byte_for_byte(client, connected, new_connection,
                                                        service_headers) -> None:
    await new_connection("tenant-b", "user-2")
    statuses = await service_headers("status:read", name="status-reader")
    tokens = await service_headers("tokens:read", name="token-reader")
    cases = [  # one tenant each for /status: its cached body is the tenant's, whoever asks
        (STATUS, "/status", {**user_headers(), "Origin": "https://app.cietrade.test"}),
        (STATUS, "/status?tenant_id=tenant-b", statuses),
        (TOKEN, f"/connections/{connected['id']}/token", tokens),
    ]
    for route, url, headers in cases:
        first, fast = await get_counted(client, route, url, headers=headers)
        assert first.status_code == 200, first.text
        assert not fast, f"{url}: nothing was cached yet, the app should have answered"
        for _ in range(50):  # a notification of the set-up's own writes may still drop an entry
            second, fast = await get_counted(client, route, url, headers=headers)
            if fast:
                break
            await asyncio.sleep(0.02)
        assert fast, f"{url}: the cached answer should have come from the fast lane"
        assert comparable(second) == comparable(first)
        assert re.fullmatch(r"[0-9a-f]{32}", second.headers["x-request-id"])
        assert second.headers["x-request-id"] != first.headers["x-request-id"]
    # CORS headers on a browser's request, from the middleware both answers pass through.
    first, fast = await get_counted(client, STATUS, "/status", headers=cases[0][2])
    assert fast and first.headers["access-control-allow-origin"] == "https://app.cietrade.test"
    # Counted under the route's template like every other request.
    before = await served(client, TOKEN)
    response, fast = await get_counted(client, TOKEN, cases[2][1], headers=tokens)
    assert fast and await served(client, TOKEN) == before + 1


async def test_a_caller_without_the_right_gets_the_apps_refusal(client, connected, service_headers,
                                                                stack: Stack) -> None:
    tokens = await service_headers("tokens:read", name="token-reader")
    token_url = f"/connections/{connected['id']}/token"
    for _ in range(2):  # both cached now: the connection and the caller
        assert (await client.get(token_url, headers=tokens)).status_code == 200
        assert (await client.get("/status", headers=user_headers())).status_code == 200

    refusals = [
        (TOKEN, token_url, await service_headers("status:read", name="status-only"), 403),
        (TOKEN, token_url, user_headers(), 403),  # users never get tokens
        (STATUS, f"/status?tenant_id={TENANT}", await service_headers("tokens:read", name="t2"), 403),
        (STATUS, f"/status?tenant_id={TENANT}", user_headers("tenant-b", "user-9"), 404),
        (STATUS, "/status", {"Authorization": "Bearer " + issue_dev_token(
            JWT_SECRET, tenant_id=TENANT, user_id="user-1", ttl_seconds=-120)}, 401),
        (STATUS, "/status", {}, 401),
    ]
    for route, url, headers, status in refusals:
        for _ in range(2):  # the second time, everything the app looked at is cached
            response, fast = await get_counted(client, route, url, headers=headers)
            assert (response.status_code, fast) == (status, False), (url, response.text)
            assert response.headers["content-type"] == "application/problem+json"

    # A revoked key stops working at once, although its caller was cached.
    await execute(stack.database_url, "UPDATE api_keys SET revoked_at = now() WHERE name = $1",
                  "token-reader")
    for _ in range(100):
        response = await client.get(token_url, headers=tokens)
        if response.status_code == 401:
            break
        await asyncio.sleep(0.02)
    assert response.status_code == 401


async def test_anything_unusual_goes_to_the_app(client, connected, service_headers,
                                                stack: Stack) -> None:
    tokens = await service_headers("tokens:read", name="token-reader")
    statuses = await service_headers("status:read", name="status-reader")
    token_url = f"/connections/{connected['id']}/token"
    first = (await client.get(token_url, headers=tokens)).json()
    cached = (await client.get(f"/status?tenant_id={TENANT}", headers=statuses)).content

    # Queries it does not know: FastAPI ignores the extra parameter, and so answers the same.
    response, fast = await get_counted(client, STATUS, f"/status?tenant_id={TENANT}&x=1",
                                       headers=statuses)
    assert (response.content, fast) == (cached, False)
    # A forced refresh is the app's: a new token.
    response, fast = await get_counted(client, TOKEN, f"{token_url}?force_refresh=true",
                                       headers=tokens)
    assert response.status_code == 200 and not fast
    forced = response.json()["access_token"]
    assert forced != first["access_token"]
    # The upper-case spelling of the id is the same connection, answered by the app.
    response, fast = await get_counted(client, TOKEN, token_url.upper().replace("/CONNECTIONS",
                                       "/connections").replace("/TOKEN", "/token"), headers=tokens)
    assert (response.status_code, fast) == (200, False)
    assert response.json()["access_token"] == forced

    # A cached token about to expire is refreshed by the app, then served from the cache again.
    await expire_access_token(stack.database_url, connected["id"], seconds_left=60)
    for _ in range(100):  # the change reaches the cache through NOTIFY
        response, fast = await get_counted(client, TOKEN, token_url, headers=tokens)
        if not fast:
            break
        await asyncio.sleep(0.02)
    assert not fast and response.json()["access_token"] != forced
    renewed = response.json()["access_token"]
    # The refresh's commit dropped the entry the app had cached; the next read fills it again.
    answers = [await get_counted(client, TOKEN, token_url, headers=tokens) for _ in range(3)]
    assert [r.json()["access_token"] for r, _ in answers] == [renewed] * 3
    assert [fast for _, fast in answers] == [False, True, True]
