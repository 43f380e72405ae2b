"""Oversized credentials are refused before anything parses them, identically on the app's path
and the direct routes' (service/core/routing.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from service.auth.jwt import MAX_BEARER_TOKEN_CHARS, JWTVerifier
from service.core.config import Settings
from service.core.errors import Unauthorized
from tests.conftest import JWT_SECRET, TENANT
from tests.test_direct_routes import STATUS, comparable, get_counted


def _jwt_of_length(length: int, **claims: Any) -> str:
    """A valid HS256 token for tenant-a, padded with a claim to exactly `length` characters."""
    base = {"sub": "user-1", "tenant_id": TENANT, "exp": int(time.time()) + 600, **claims}
    pad = max(0, length - len(jwt.encode({**base, "pad": ""}, JWT_SECRET, algorithm="HS256")))
    for extra in range(pad, -1, -1):
        token = jwt.encode({**base, "pad": "x" * extra}, JWT_SECRET, algorithm="HS256")
        if len(token) <= length:
            return token
    raise AssertionError("cannot build the token")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_at_the_limit_is_accepted_one_past_it_refused(client: httpx.AsyncClient) -> None:
    at_limit = _jwt_of_length(MAX_BEARER_TOKEN_CHARS)
    assert len(at_limit) > MAX_BEARER_TOKEN_CHARS - 4
    assert (await client.get("/connections", headers=_bearer(at_limit))).status_code == 200
    too_long = _jwt_of_length(MAX_BEARER_TOKEN_CHARS + 8)
    assert len(too_long) > MAX_BEARER_TOKEN_CHARS
    # Validly signed and unexpired, yet refused for its size alone.
    assert jwt.decode(too_long, JWT_SECRET, algorithms=["HS256"])["tenant_id"] == TENANT
    response = await client.get("/connections", headers=_bearer(too_long))
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unauthorized"
    assert "too long" in response.json()["detail"]


async def test_the_direct_route_refuses_it_as_the_documented_route_does(client: httpx.AsyncClient) -> None:
    headers = _bearer(_jwt_of_length(MAX_BEARER_TOKEN_CHARS + 100))
    by_app, direct = await get_counted(client, STATUS, "/status?via=app", headers=headers)
    assert (by_app.status_code, direct) == (401, False)
    for _ in range(2):
        by_route, direct = await get_counted(client, STATUS, "/status", headers=headers)
        assert (by_route.status_code, direct) == (401, True)
        assert comparable(by_route) == comparable(by_app)


@pytest.mark.parametrize("path", ["/status", "/connections", "/connections/{id}/token"])
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_megabytes_of_credentials_are_refused_at_once(
    client: httpx.AsyncClient, new_connection, path: str, header: str
) -> None:
    conn = await new_connection()
    url = path.replace("{id}", conn["id"])
    # Shaped like a JWT, so that a parser would go to work on it.
    blob = "eyJhbGciOiJIUzI1NiJ9." + "A" * (4 * 1024 * 1024) + ".sig"
    value = f"Bearer {blob}" if header == "Authorization" else blob
    started = time.perf_counter()
    response = await client.get(url, headers={header: value})
    elapsed = time.perf_counter() - started
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "unauthorized"
    assert blob[:100] not in response.text
    assert elapsed < 1.0, elapsed


async def test_the_verifier_refuses_before_parsing() -> None:
    verifier = JWTVerifier(Settings(BROKER_JWT_SECRET=JWT_SECRET))  # type: ignore[call-arg]
    with pytest.raises(Unauthorized, match="too long"):
        await verifier.verify(_jwt_of_length(MAX_BEARER_TOKEN_CHARS + 50))


# -- the lifetime cap ------------------------------------------------------------------------


async def test_token_lifetime_cap() -> None:
    verifier = JWTVerifier(
        Settings(
            BROKER_JWT_SECRET=JWT_SECRET,  # type: ignore[call-arg]
            BROKER_JWT_MAX_LIFETIME_SECONDS=3600,
        )
    )
    now = int(time.time())

    def token(**claims: Any) -> str:
        return jwt.encode({"sub": "u", "tenant_id": "t", **claims}, JWT_SECRET, algorithm="HS256")

    assert await verifier.verify(token(iat=now, exp=now + 3600))
    assert await verifier.verify(token(exp=now + 3000))  # no iat: counted from now
    for too_long in (
        token(iat=now, exp=now + 3601),
        token(iat=now - 7200, exp=now + 60),
        token(exp=now + 4000),
    ):
        with pytest.raises(Unauthorized, match="lifetime"):
            await verifier.verify(too_long)
    uncapped = JWTVerifier(Settings(BROKER_JWT_SECRET=JWT_SECRET))  # type: ignore[call-arg]
    assert await uncapped.verify(token(iat=now, exp=now + 10 * 365 * 86400))
