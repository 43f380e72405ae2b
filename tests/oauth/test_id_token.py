"""The id_token from a code exchange is verified: signature (discovery's jwks_uri), iss, aud, exp,
the nonce of this authorization, and the same `sub` as userinfo.

Intuit is played here by an `httpx.MockTransport` that signs with keys the test makes, so that
each way an id_token can be wrong is one line; the flow test runs on the real database.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from service.intuit.client import IntuitClient
from service.intuit.errors import InvalidIdToken
from tests.conftest import CLIENT_ID, broker_settings, user_headers

ISSUER = "https://oauth.example.test/op/v1"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeIntuit:
    """Discovery, JWKS, token, userinfo and CompanyInfo: just enough of Intuit for one exchange."""

    def __init__(self) -> None:
        self.key, self.kid = _key(), "k-1"
        self.claims: dict[str, Any] = {}
        self.userinfo_sub = "qb-user-1"
        self.jwks_fetches = 0
        self.revoked: list[str] = []

    def id_token(self, *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "sub": "qb-user-1",
            "aud": [CLIENT_ID],
            "iss": ISSUER,
            "iat": now,
            "exp": now + 3600,
            **claims,
        }
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            key or self.key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/openid_configuration":
            base = "https://oauth.example.test"
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "authorization_endpoint": f"{base}/authorize",
                    "token_endpoint": f"{base}/token",
                    "revocation_endpoint": f"{base}/revoke",
                    "userinfo_endpoint": f"{base}/userinfo",
                    "jwks_uri": f"{base}/jwks",
                },
            )
        if path == "/jwks":
            self.jwks_fetches += 1
            jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
            return httpx.Response(
                200, json={"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}
            )
        if path == "/token":
            nonce = self.claims.pop("nonce_from_request", None)
            return httpx.Response(
                200,
                json={
                    "access_token": "at-1",
                    "refresh_token": "rt-1",
                    "token_type": "bearer",
                    "expires_in": 3600,
                    "x_refresh_token_expires_in": 8726400,
                    "id_token": self.id_token(**{"nonce": nonce, **self.claims}),
                },
            )
        if path == "/userinfo":
            return httpx.Response(200, json={"sub": self.userinfo_sub, "email": "a@b.test"})
        if path.startswith("/v3/company/"):
            return httpx.Response(200, json={"CompanyInfo": {"CompanyName": "Fake Co"}})
        if path == "/revoke":
            self.revoked.append(json.loads(request.content)["token"])
            return httpx.Response(200)
        return httpx.Response(404)


@pytest.fixture
def fake() -> FakeIntuit:
    return FakeIntuit()


def _client(fake: FakeIntuit, **overrides: Any) -> IntuitClient:
    settings = broker_settings(
        "postgresql://unused/db",
        1,
        "https://oauth.example.test",
        INTUIT_DISCOVERY_URL="https://oauth.example.test/.well-known/openid_configuration",
        **overrides,
    )
    return IntuitClient(settings, transport=httpx.MockTransport(fake.handler))


async def test_a_good_id_token_verifies(fake: FakeIntuit) -> None:
    intuit = _client(fake)
    claims = await intuit.verify_id_token(fake.id_token(nonce="n-1"), nonce="n-1")
    assert claims["sub"] == "qb-user-1"


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": "another"},
        {"nonce": None},
        {"aud": ["someone-else"]},
        {"iss": "https://evil.test"},
        {"exp": int(time.time()) - 3600},
        {"sub": None},
        {"iss": None},
    ],
)
async def test_a_wrong_claim_is_refused(fake: FakeIntuit, change: dict[str, Any]) -> None:
    intuit = _client(fake)
    token = fake.id_token(**{"nonce": "n-1", **change})
    with pytest.raises(InvalidIdToken):
        await intuit.verify_id_token(token, nonce="n-1")


async def test_a_foreign_signature_or_algorithm_is_refused(fake: FakeIntuit) -> None:
    intuit = _client(fake)
    with pytest.raises(InvalidIdToken):  # same kid, another key
        await intuit.verify_id_token(fake.id_token(key=_key(), nonce="n"), nonce="n")
    unsigned = jwt.encode(
        {"sub": "x", "aud": [CLIENT_ID], "iss": ISSUER, "exp": int(time.time()) + 60},
        "s" * 32,
        algorithm="HS256",
        headers={"kid": fake.kid},
    )
    with pytest.raises(InvalidIdToken):
        await intuit.verify_id_token(unsigned, nonce=None)


async def test_a_new_signing_key_is_fetched_once_and_an_unknown_one_refused(fake: FakeIntuit) -> None:
    intuit = _client(fake)
    await intuit.verify_id_token(fake.id_token(nonce="n"), nonce="n")
    assert fake.jwks_fetches == 1
    with pytest.raises(InvalidIdToken):  # not published, and just fetched: no second fetch
        await intuit.verify_id_token(fake.id_token(kid="k-unknown", nonce="n"), nonce="n")
    assert fake.jwks_fetches == 1


async def _callback_through(
    fake: FakeIntuit, stack: Any, client: httpx.AsyncClient, new_connection: Any, runtime: Any
) -> tuple[str, Any]:
    """Start Connect on the real broker, then run the callback flow with `fake` as Intuit."""
    from dataclasses import replace

    from service.oauth import flows

    conn = await new_connection()
    started = await client.post(
        f"/connections/{conn['id']}/authorize",
        json={"return_url": "https://app.cietrade.test/x"},
        headers=user_headers(),
    )
    query = parse_qs(urlsplit(started.json()["authorization_url"]).query)
    fake.claims["nonce_from_request"] = query["nonce"][0]
    intuit = _client(fake, INTUIT_API_BASE_URL="https://oauth.example.test")
    outcome = await flows.complete_callback(
        replace(runtime, intuit=intuit),
        state=query["state"][0],
        code="c-" + uuid.uuid4().hex,
        realm_id="1234567890",
        error=None,
        cookies={},
    )
    return conn["id"], outcome


async def test_the_callback_accepts_a_verified_id_token(fake, stack, client, new_connection, runtime) -> None:
    _, outcome = await _callback_through(fake, stack, client, new_connection, runtime)
    assert outcome.result == "completion_required", outcome.error
    assert fake.revoked == []


@pytest.mark.parametrize("spoil", ["nonce", "sub"])
async def test_the_callback_refuses_and_revokes_an_unverified_identity(
    fake, stack, client, new_connection, runtime, spoil: str
) -> None:
    if spoil == "nonce":
        fake.claims["nonce"] = "not-the-one-sent"
    else:
        fake.userinfo_sub = "qb-user-2"  # userinfo names another user than the id_token
    connection_id, outcome = await _callback_through(fake, stack, client, new_connection, runtime)
    assert outcome.result == "error"
    assert outcome.error.code == "quickbooks_identity_not_verified"
    assert fake.revoked == ["rt-1"]  # the grant obtained is not kept at Intuit
    body = (await client.get(f"/connections/{connection_id}", headers=user_headers())).json()
    assert body["status"] == "pending"
    assert body["last_error"]["code"] == "quickbooks_identity_not_verified"
