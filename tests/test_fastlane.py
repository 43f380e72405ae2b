"""The fast lane (service/fastlane.py) answers cached reads exactly as the app would, and leaves
everything else (errors above all) to the app."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
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


def comparable(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers in the order sent (but those that differ every time), and body."""
    headers = [(k, v) for k, v in response.headers.raw if k.decode().lower() not in PER_RESPONSE]
    return response.status_code, headers, response.content


@pytest.fixture
async def connected(linked) -> str:
    return str(await linked())


async def test_its_answers_are_the_apps_byte_for_byte(client, connected, new_connection,
                                                     service_headers) -> None:
    await new_connection("tenant-b", "user-2")
    statuses = await service_headers("status:read", name="status-reader")
    tokens = await service_headers("tokens:read", name="token-reader")
    # The app's answer is asked for with a parameter the app ignores and the fast lane leaves
    # to it; the fast lane's with the plain URL.
    cases = [
        (STATUS, "/status", "/status?via=app",
         {**user_headers(), "Origin": "https://app.cietrade.test"}),
        (STATUS, "/status?tenant_id=tenant-b", "/status?tenant_id=tenant-b&via=app", statuses),
        (TOKEN, f"/connections/{connected}/token",
         f"/connections/{connected}/token?force_refresh=false", tokens),
    ]
    for route, url, app_url, headers in cases:
        by_app, fast = await get_counted(client, route, app_url, headers=headers)
        assert by_app.status_code == 200, by_app.text
        assert not fast, f"{app_url}: the app should have answered"
        for _ in range(50):  # until the API key is cached (its first use notifies a change)
            by_lane, fast = await get_counted(client, route, url, headers=headers)
            if fast:
                break
            await asyncio.sleep(0.02)
        assert fast, f"{url}: the fast lane should have answered"
        assert comparable(by_lane) == comparable(by_app)
        assert re.fullmatch(r"[0-9a-f]{32}", by_lane.headers["x-request-id"])
        assert by_lane.headers["x-request-id"] != by_app.headers["x-request-id"]
    # CORS headers on a browser's request, from the middleware both answers pass through.
    first, fast = await get_counted(client, STATUS, "/status", headers=cases[0][3])
    assert fast and first.headers["access-control-allow-origin"] == "https://app.cietrade.test"
    # Counted under the route's template like every other request.
    before = await served(client, TOKEN)
    response, fast = await get_counted(client, TOKEN, cases[2][1], headers=tokens)
    assert fast and await served(client, TOKEN) == before + 1


async def test_a_valid_jwt_seen_for_the_first_time_is_verified_in_the_fast_lane(
        client, new_connection) -> None:
    await new_connection("tenant-c", "user-3")
    headers = user_headers("tenant-c", "user-4")  # a token nobody has shown the broker yet
    response, fast = await get_counted(client, STATUS, "/status", headers=headers)
    assert (response.status_code, fast) == (200, True)
    assert response.json()["tenant_id"] == "tenant-c"
    # A forged one (signed with another secret) is the app's to refuse.
    forged = {"Authorization": "Bearer " + issue_dev_token("another-secret-" + "y" * 32,
                                                           tenant_id="tenant-c", user_id="user-3")}
    response, fast = await get_counted(client, STATUS, "/status", headers=forged)
    assert (response.status_code, fast) == (401, False)
    assert response.json()["code"] == "unauthorized"


async def test_a_caller_without_the_right_gets_the_apps_refusal(client, connected, service_headers,
                                                                stack: Stack) -> None:
    tokens = await service_headers("tokens:read", name="token-reader")
    token_url = f"/connections/{connected}/token"
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

    # A tenant id the app would refuse as a parameter, although a JWT carried it and its
    # status is cached: the app's 422, not the cached body.
    odd = {"Authorization": "Bearer " + issue_dev_token(JWT_SECRET, tenant_id="acme corp",
                                                        user_id="user-5")}
    for _ in range(2):
        assert (await client.get("/status", headers=odd)).status_code == 200
    statuses = await service_headers("status:read", name="status-reader")
    for _ in range(100):  # until the key is cached (its first use notifies a change once)
        response, fast = await get_counted(client, STATUS, f"/status?tenant_id={TENANT}",
                                           headers=statuses)
        if fast:
            break
        await asyncio.sleep(0.02)
    assert fast
    for query in ["acme%20corp", "acme%20corp", f"{TENANT}%0A", "x" * 129]:
        response, fast = await get_counted(client, STATUS, f"/status?tenant_id={query}",
                                           headers=statuses)
        assert (response.status_code, fast) == (422, False), (query, response.text)

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
    token_url = f"/connections/{connected}/token"
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

    # A token about to expire: once the change reaches the cache (NOTIFY), the next read
    # misses; the caller is known, so the fast lane reads the connection and refreshes it.
    await expire_access_token(stack.database_url, connected, seconds_left=60)
    for _ in range(100):
        response, fast = await get_counted(client, TOKEN, token_url, headers=tokens)
        if response.json()["access_token"] != forced:
            break
        await asyncio.sleep(0.02)
    renewed = response.json()["access_token"]
    assert fast and renewed != forced
    answers = [await get_counted(client, TOKEN, token_url, headers=tokens) for _ in range(3)]
    assert [(r.json()["access_token"], fast) for r, fast in answers] == [(renewed, True)] * 3


async def _known_key(client: httpx.AsyncClient, service_headers, cid: str) -> dict[str, str]:
    """A tokens:read key the broker has looked up and cached. Its first use touches the key's
    last_used_at, and the notification of that change empties the key cache once: ask until
    the fast lane answers, after which the key stays cached."""
    headers = await service_headers("tokens:read", name="token-reader")
    for _ in range(100):
        response, fast = await get_counted(client, TOKEN, f"/connections/{cid}/token",
                                           headers=headers)
        assert response.status_code == 200, response.text
        if fast:
            return headers
        await asyncio.sleep(0.02)
    raise AssertionError("the key never reached the cache")


async def _cache_ageing_token(client: httpx.AsyncClient, stack: Stack, cid: str,
                              headers: dict[str, str]) -> None:
    """Cache the connection with a token valid for 5 minutes and 1 second, then let that second
    pass: the cached view stays, but its token is no longer fresh enough to hand out."""
    await expire_access_token(stack.database_url, cid, seconds_left=301)
    for _ in range(100):  # until the change has reached the cache and been read back
        body = (await client.get(f"/connections/{cid}/token", headers=headers)).json()
        left = (datetime.fromisoformat(body["expires_at"]) - datetime.now(UTC)).total_seconds()
        if left < 302:
            break
        await asyncio.sleep(0.02)
    assert left < 302
    await asyncio.sleep(1.2)


async def test_a_cached_connection_that_needs_a_refresh_is_refreshed_in_the_fast_lane(
        client, emulator, linked_company, service_headers, stack: Stack) -> None:
    cid, _ = await linked_company(1)
    tokens = await _known_key(client, service_headers, cid)
    first = (await client.get(f"/connections/{cid}/token", headers=tokens)).json()
    await _cache_ageing_token(client, stack, cid, tokens)
    refreshes = (await emulator.get("/stats")).json()["token"].get("refresh_token", {})
    response, fast = await get_counted(client, TOKEN, f"/connections/{cid}/token", headers=tokens)
    assert (response.status_code, fast) == (200, True)
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["access_token"] != first["access_token"]
    after = (await emulator.get("/stats")).json()["token"]["refresh_token"]
    assert after.get("ok", 0) == refreshes.get("ok", 0) + 1


async def test_a_refused_refresh_reads_the_same_from_the_fast_lane_and_the_app(
        client, emulator, linked_company, service_headers, stack: Stack) -> None:
    """Two connections disconnected inside QuickBooks: the app refreshes one (asked with a
    query string, which the fast lane leaves to it), the fast lane the other; both callers are
    told the same."""
    (by_app, app_realm), (by_lane, lane_realm) = [await linked_company(i) for i in (2, 3)]
    tokens = await _known_key(client, service_headers, by_lane)
    await _cache_ageing_token(client, stack, by_lane, tokens)
    for realm in (app_realm, lane_realm):
        assert (await emulator.post(f"/companies/{realm}/disconnect")).status_code == 200
    await expire_access_token(stack.database_url, by_app)

    answers = {}
    for cid, query in ((by_app, "?force_refresh=false"), (by_lane, "")):
        for _ in range(100):  # by_app: until its cached view is gone (NOTIFY)
            response, fast = await get_counted(client, TOKEN, f"/connections/{cid}/token{query}",
                                               headers=tokens)
            if response.status_code == 409:
                break
            await asyncio.sleep(0.02)
        answers[cid] = response, fast
    (app, app_fast), (lane, lane_fast) = answers[by_app], answers[by_lane]
    assert (app_fast, lane_fast) == (False, True)
    assert app.status_code == lane.status_code == 409
    assert comparable(app)[1] == comparable(lane)[1]  # headers, content-length included
    assert app.json() == {**lane.json(), "connection_id": by_app}
    assert lane.json()["code"] == "reauthorization_required"
    for cid in (by_app, by_lane):
        body = (await client.get(f"/connections/{cid}", headers=user_headers())).json()
        assert (body["status"], body["last_error"]["code"]) == ("reauthorization_required",
                                                                "invalid_grant")
