"""The direct routes of GET /status and GET /connections/{id}/token (service.core.routing) answer
exactly as the documented FastAPI routes do, for every caller and target, and decline every form
they do not serve."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest

from service.auth.jwt import issue_dev_token
from service.connections.router import direct_routes
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


async def direct_answers(client: httpx.AsyncClient, route: str) -> float:
    return await sample(client, f'qbo_broker_direct_answers_total{{route="{route}"}}')


async def get_counted(
    client: httpx.AsyncClient, route: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, bool]:
    """The response, and whether the direct route gave it."""
    before = await direct_answers(client, route)
    response = await client.get(url, **kwargs)
    return response, await direct_answers(client, route) == before + 1


async def served(client: httpx.AsyncClient, route: str) -> float:
    """Requests counted as GET route answered 200."""
    return await sample(
        client, f'qbo_broker_http_requests_total{{method="GET",route="{route}",status="200"}}'
    )


def comparable(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers in the order sent (but those that differ every time), and body."""
    headers = [(k, v) for k, v in response.headers.raw if k.decode().lower() not in PER_RESPONSE]
    return response.status_code, headers, response.content


def _scope(path: str, query: bytes = b"", method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "root_path": "",
        "headers": [],
    }


def test_the_direct_routes_take_only_their_plain_forms() -> None:
    status, token = direct_routes
    cid = "0b8f3a52-51a1-4f64-9a8c-3d0f2f6a1e01"
    taken = [
        (status, _scope("/status")),
        (status, _scope("/status", b"tenant_id=tenant-a")),
        (token, _scope(f"/connections/{cid}/token")),
    ]
    declined = [
        (status, _scope("/status", method="POST")),
        (status, _scope("/status/")),
        (status, _scope("/status", b"tenant_id=tenant-a&x=1")),
        (status, _scope("/status", b"tenant_id=acme%20corp")),
        (status, _scope("/status", b"x=1")),
        (status, _scope("/status", b"tenant_id=" + b"x" * 129)),
        (status, _scope("/status", b"tenant_id=a&tenant_id=b")),
        (token, _scope(f"/connections/{cid}/token", b"force_refresh=true")),
        (token, _scope(f"/connections/{cid.upper()}/token")),
        (token, _scope(f"/connections/{cid.replace('-', '')}/token")),
        (token, _scope("/connections/not-a-uuid/token")),
        (token, _scope(f"/connections/{cid}/token", method="HEAD")),
        (token, _scope(f"/connections/{cid}/events")),
        (token, {**_scope(f"/connections/{cid}/token"), "root_path": "/broker"}),
    ]
    for route, scope in taken:
        assert route.matches(scope)[0].name == "FULL", scope
    for route, scope in declined:
        assert route.matches(scope)[0].name == "NONE", scope


def _callers(
    tokens_key: dict[str, str], status_key: dict[str, str], revoked_key: dict[str, str]
) -> dict[str, dict[str, str]]:
    now = int(time.time())
    forged = jwt.encode(
        {"sub": "u", "tenant_id": TENANT, "exp": now + 600}, "another-" + "y" * 32, algorithm="HS256"
    )
    return {
        "nobody": {},
        "user": user_headers(),
        "user of another tenant": user_headers("tenant-b", "user-2"),
        "expired user": {
            "Authorization": "Bearer "
            + issue_dev_token(JWT_SECRET, tenant_id=TENANT, user_id="user-1", ttl_seconds=-120)
        },
        "forged user": {"Authorization": f"Bearer {forged}"},
        "user with an odd tenant": {
            "Authorization": "Bearer " + issue_dev_token(JWT_SECRET, tenant_id="acme corp", user_id="user-5")
        },
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "bearer without a token": {"Authorization": "Bearer"},
        "oversized bearer": {"Authorization": "Bearer " + "a" * 9000},
        "tokens key": tokens_key,
        "status key": status_key,
        "revoked key": revoked_key,
        "unknown key": {"X-API-Key": "qbo_unknown_" + "z" * 40},
        "oversized key": {"X-API-Key": "k" * 300},
        "key and user": {**user_headers("tenant-b", "user-2"), **tokens_key},
    }


async def test_every_caller_and_target_is_answered_as_the_documented_route_does(
    client, connected, new_connection, service_headers, stack: Stack
) -> None:
    """Each caller against each target, on the direct route (the plain URL) and on the FastAPI
    route (the same URL with a parameter the endpoint ignores, which the direct route declines):
    status, headers and body alike."""
    other = (await new_connection("tenant-b", "user-2"))["id"]
    revoked = await service_headers("tokens:read", "status:read", name="revoked")
    await execute(stack.database_url, "UPDATE api_keys SET revoked_at = now() WHERE name = $1", "revoked")
    callers = _callers(
        await service_headers("tokens:read", name="token-reader"),
        await service_headers("status:read", name="status-reader"),
        revoked,
    )
    targets = [
        (STATUS, "/status", "/status?via=app"),
        (STATUS, f"/status?tenant_id={TENANT}", f"/status?tenant_id={TENANT}&via=app"),
        (STATUS, "/status?tenant_id=tenant-b", "/status?tenant_id=tenant-b&via=app"),
        (TOKEN, f"/connections/{connected}/token", f"/connections/{connected}/token?force_refresh=false"),
        (TOKEN, f"/connections/{other}/token", f"/connections/{other}/token?force_refresh=false"),
        (
            TOKEN,
            "/connections/6f1c1c3e-8d2e-4a55-b7b0-6d1f8e1e0c99/token",
            "/connections/6f1c1c3e-8d2e-4a55-b7b0-6d1f8e1e0c99/token?force_refresh=false",
        ),
    ]
    statuses = set()
    for (name, headers), (route, url, app_url) in itertools.product(callers.items(), targets):
        for _ in range(2):  # cold, then with whatever the first request cached
            by_app, direct = await get_counted(client, route, app_url, headers=headers)
            assert not direct, app_url
            by_route, direct = await get_counted(client, route, url, headers=headers)
            assert direct, url
            assert comparable(by_route) == comparable(by_app), (name, url, by_route.text)
        statuses.add(by_route.status_code)
    assert statuses == {200, 401, 403, 404, 409, 422}  # successes and each refusal compared


@pytest.fixture
async def connected(linked) -> str:
    return str(await linked())


async def test_what_the_direct_routes_decline_the_documented_routes_answer(
    client, connected, service_headers, stack: Stack
) -> None:
    tokens = await service_headers("tokens:read", name="token-reader")
    statuses = await service_headers("status:read", name="status-reader")
    token_url = f"/connections/{connected}/token"
    first = (await client.get(token_url, headers=tokens)).json()
    cached = (await client.get(f"/status?tenant_id={TENANT}", headers=statuses)).content

    # Queries it does not know: FastAPI ignores the extra parameter, and so answers the same.
    response, fast = await get_counted(client, STATUS, f"/status?tenant_id={TENANT}&x=1", headers=statuses)
    assert (response.content, fast) == (cached, False)
    # A forced refresh is the app's: a new token.
    response, fast = await get_counted(client, TOKEN, f"{token_url}?force_refresh=true", headers=tokens)
    assert response.status_code == 200 and not fast
    forced = response.json()["access_token"]
    assert forced != first["access_token"]
    # The upper-case spelling of the id is the same connection, answered by the app.
    response, fast = await get_counted(
        client,
        TOKEN,
        token_url.upper().replace("/CONNECTIONS", "/connections").replace("/TOKEN", "/token"),
        headers=tokens,
    )
    assert (response.status_code, fast) == (200, False)
    assert response.json()["access_token"] == forced

    # A token about to expire: once the change reaches the cache (NOTIFY), the next read
    # misses, and the direct route reads the connection and refreshes it.
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
    the direct route serves it from the cache."""
    headers = await service_headers("tokens:read", name="token-reader")
    for _ in range(100):
        response, fast = await get_counted(client, TOKEN, f"/connections/{cid}/token", headers=headers)
        assert response.status_code == 200, response.text
        if fast:
            return headers
        await asyncio.sleep(0.02)
    raise AssertionError("the key never reached the cache")


async def _cache_ageing_token(
    client: httpx.AsyncClient, stack: Stack, cid: str, headers: dict[str, str]
) -> None:
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


async def test_a_cached_connection_that_needs_a_refresh_is_refreshed_on_the_direct_route(
    client, emulator, linked_company, service_headers, stack: Stack
) -> None:
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


async def test_a_refused_refresh_reads_the_same_on_both_routes(
    client, emulator, linked_company, service_headers, stack: Stack
) -> None:
    """Two connections disconnected inside QuickBooks: the app refreshes one (asked with a
    query string, which the direct route declines), the direct route the other; both callers are
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
            response, fast = await get_counted(
                client, TOKEN, f"/connections/{cid}/token{query}", headers=tokens
            )
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
        assert (body["status"], body["last_error"]["code"]) == ("reauthorization_required", "invalid_grant")
