"""Callers: user JWTs (HS256, RS256 key, JWKS, issuer/audience) and service API keys."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.auth.jwt import JWTVerifier
from service.core.config import Settings
from service.core.errors import Unauthorized
from tests.conftest import JWT_SECRET, RETURN_URL, user_headers
from tests.support.servers import ThreadedServer, free_port


def _token(
    claims: dict[str, Any], key: Any = JWT_SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None
) -> str:
    base = {"sub": "user-1", "tenant_id": "tenant-a", "exp": int(time.time()) + 600}
    return jwt.encode({**base, **claims}, key, algorithm=alg, headers=headers)


@pytest.mark.parametrize(
    "headers,why",
    [
        ({}, "no credentials"),
        ({"Authorization": "Bearer not-a-jwt"}, "garbage"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "wrong scheme"),
        ({"Authorization": f"Bearer {_token({}, key='another-secret-of-sufficient-length!!')}"}, "forged"),
        ({"Authorization": f"Bearer {_token({'exp': int(time.time()) - 3600})}"}, "expired"),
        ({"Authorization": f"Bearer {jwt.encode({'sub': 'u', 'tenant_id': 't'}, JWT_SECRET)}"}, "no exp"),
        ({"Authorization": f"Bearer {_token({'tenant_id': None})}"}, "no tenant"),
        (
            {
                "Authorization": "Bearer "
                + jwt.encode({"sub": "u", "tenant_id": "t", "exp": 9999999999}, None, algorithm="none")
            },
            "alg none",
        ),
        ({"X-API-Key": "qbk_00000000_unknown"}, "unknown key"),
    ],
)
async def test_bad_credentials_are_401_problems(client: httpx.AsyncClient, headers, why) -> None:
    response = await client.get("/connections", headers=headers)
    assert response.status_code == 401, why
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "unauthorized" and body["status"] == 401
    assert "Traceback" not in response.text


async def test_valid_jwt_is_accepted(client) -> None:
    response = await client.get("/connections", headers={"Authorization": f"Bearer {_token({})}"})
    assert response.status_code == 200


async def test_revoked_api_key_stops_working(client, service_headers, stack) -> None:
    from service.auth.api_keys import revoke_api_key
    from service.core.db.engine import build_engine, build_sessionmaker
    from tests.support.db_helpers import fetchrow

    headers = await service_headers("status:read")
    assert (await client.get("/status", params={"tenant_id": "t"}, headers=headers)).status_code == 200
    row = await fetchrow(stack.database_url, "SELECT id, key_hash FROM api_keys")
    assert row["key_hash"] != headers["X-API-Key"]  # only a hash is stored
    assert headers["X-API-Key"] not in json.dumps([str(v) for v in row.values()])
    engine = build_engine(stack.database_url, pool_size=1)
    async with build_sessionmaker(engine)() as session, session.begin():
        assert await revoke_api_key(session, row["id"])
    await engine.dispose()
    assert (await client.get("/status", params={"tenant_id": "t"}, headers=headers)).status_code == 401


async def test_service_scopes_are_enforced(client, service_headers, new_connection) -> None:
    conn = await new_connection()
    reader = await service_headers("status:read")
    writer = await service_headers("connections:write")
    assert (await client.get(f"/connections/{conn['id']}", headers=reader)).status_code == 200
    listed = await client.get("/connections", params={"tenant_id": "tenant-a"}, headers=reader)
    assert [c["id"] for c in listed.json()["items"]] == [conn["id"]]
    denied = await client.post("/connections", json={"tenant_id": "tenant-a"}, headers=reader)
    assert denied.status_code == 403
    created = await client.post("/connections", json={"tenant_id": "tenant-z"}, headers=writer)
    assert created.status_code == 201 and created.json()["tenant_id"] == "tenant-z"
    missing_tenant = await client.post("/connections", json={}, headers=writer)
    assert missing_tenant.status_code == 422
    no_user = await client.post(f"/connections/{conn['id']}/authorize", json={}, headers=writer)
    assert no_user.status_code == 422
    with_user = await client.post(
        f"/connections/{conn['id']}/authorize",
        json={"user_id": "user-9", "return_url": RETURN_URL},
        headers=writer,
    )
    assert with_user.status_code == 200


async def test_return_url_must_be_on_the_allowlist(client, new_connection) -> None:
    conn = await new_connection()
    url = f"/connections/{conn['id']}/authorize"
    for bad in (
        "https://evil.test/x",
        "https://app.cietrade.test.evil.test/",
        "http://app.cietrade.test/",
        "https://app.cietrade.test:8443/",
    ):
        response = await client.post(url, json={"return_url": bad}, headers=user_headers())
        assert response.status_code == 400, bad
        assert response.json()["code"] == "return_url_not_allowed"
    ok = await client.post(
        url, json={"return_url": "https://app.cietrade.test/a?b=c"}, headers=user_headers()
    )
    assert ok.status_code == 200


# -- RS256 and JWKS, against the verifier directly ---------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_server(rsa_key) -> Iterator[str]:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    keys = {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}
    app = Starlette(routes=[Route("/jwks", lambda request: JSONResponse(keys))])
    server = ThreadedServer(app, free_port()).start()
    yield f"{server.url}/jwks"
    server.stop()


def _settings(**values: Any) -> Settings:
    return Settings(**values)


async def test_rs256_with_public_key_and_issuer_audience(rsa_key) -> None:
    pem = (
        rsa_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    verifier = JWTVerifier(
        _settings(
            BROKER_JWT_PUBLIC_KEY=pem,
            BROKER_JWT_ISSUER="https://id.cietrade",
            BROKER_JWT_AUDIENCE="qbo-broker",
        )
    )
    good = _token({"iss": "https://id.cietrade", "aud": "qbo-broker"}, key=rsa_key, alg="RS256")
    assert (await verifier.verify(good))["sub"] == "user-1"
    for claims in (
        {"iss": "https://other", "aud": "qbo-broker"},
        {"iss": "https://id.cietrade", "aud": "someone-else"},
        {},
    ):
        with pytest.raises(Unauthorized):
            await verifier.verify(_token(claims, key=rsa_key, alg="RS256"))
    # An HS256 token signed with the public key as secret (key confusion) is refused.
    with pytest.raises(Unauthorized):
        await verifier.verify(_token({"iss": "https://id.cietrade", "aud": "qbo-broker"}))


async def test_rs256_via_jwks(rsa_key, jwks_server) -> None:
    verifier = JWTVerifier(_settings(BROKER_JWT_JWKS_URL=jwks_server))
    good = _token({}, key=rsa_key, alg="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(good))["tenant_id"] == "tenant-a"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthorized):
        await verifier.verify(_token({}, key=other, alg="RS256", headers={"kid": "k1"}))
    with pytest.raises(Unauthorized):
        await verifier.verify(_token({}, key=rsa_key, alg="RS256", headers={"kid": "unknown"}))
