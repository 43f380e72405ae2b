"""User JWTs verified against a JWKS served over HTTP: removed keys stop working at the next
fetch, unknown key ids fetch again at most once per cooldown, and a JWKS that does not answer
is a 503 after a bounded wait."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.auth.jwt import JWTVerifier, SigningKeysUnavailable
from service.core.config import Settings
from service.core.errors import Unauthorized
from tests.support.servers import ThreadedServer, free_port

ISSUER, AUDIENCE = "https://id.cietrade.test", "qbo-broker"


@dataclass
class KeySet:
    """What the JWKS endpoint serves, changed by the tests; counts the fetches."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    fetches: int = 0
    hang: threading.Event = field(default_factory=threading.Event)

    def document(self) -> dict[str, Any]:
        return {
            "keys": [
                {
                    **jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True),
                    "kid": kid,
                    "use": "sig",
                    "alg": "RS256",
                }
                for kid, key in self.keys.items()
            ]
        }


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture
def jwks() -> Iterator[tuple[str, KeySet]]:
    served = KeySet()

    async def endpoint(request: Request) -> Response:
        served.fetches += 1
        if served.hang.is_set():
            await asyncio.sleep(3)
        return JSONResponse(served.document())

    server = ThreadedServer(Starlette(routes=[Route("/jwks", endpoint)]), free_port()).start()
    yield f"{server.url}/jwks", served
    served.hang.clear()
    server.stop()


def _token(key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    base = {
        "sub": "user-1",
        "tenant_id": "tenant-a",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 600,
    }
    return jwt.encode({**base, **claims}, key, algorithm="RS256", headers={"kid": kid})


def _verifier(url: str, **options: float) -> JWTVerifier:
    return JWTVerifier(
        Settings(
            BROKER_JWT_JWKS_URL=url,
            BROKER_JWT_ISSUER=ISSUER,  # type: ignore[call-arg]
            BROKER_JWT_AUDIENCE=AUDIENCE,
        ),
        **options,
    )


async def test_a_removed_key_stops_working_at_the_next_fetch(jwks, rsa_keys) -> None:
    url, served = jwks
    served.keys = {"k1": rsa_keys[0], "k2": rsa_keys[1]}
    verifier = _verifier(url, jwks_lifespan=0.5)
    seen = _token(rsa_keys[0], "k1")
    assert (await verifier.verify(seen))["sub"] == "user-1"
    assert await verifier.verify(_token(rsa_keys[1], "k2", sub="user-2"))
    assert served.fetches == 1  # one key set for both
    del served.keys["k1"]  # the identity provider retires k1
    await asyncio.sleep(0.6)  # the key set's lifespan
    with pytest.raises(Unauthorized, match="signing key"):
        await verifier.verify(_token(rsa_keys[0], "k1", sub="user-3"))
    # Not even the token verified before, whose key is gone, is trusted any longer.
    with pytest.raises(Unauthorized, match="signing key"):
        await verifier.verify(seen)
    assert await verifier.verify(_token(rsa_keys[1], "k2", sub="user-4"))


async def test_keys_are_kept_for_the_lifespan(jwks, rsa_keys) -> None:
    url, served = jwks
    served.keys = {"k1": rsa_keys[0]}
    verifier = _verifier(url)  # the production lifespan and cooldown
    for user in range(5):
        assert await verifier.verify(_token(rsa_keys[0], "k1", sub=f"user-{user}"))
    assert served.fetches == 1


async def test_unknown_key_ids_refetch_at_most_once_per_cooldown(jwks, rsa_keys) -> None:
    url, served = jwks
    served.keys = {"k1": rsa_keys[0]}
    verifier = _verifier(url, jwks_cooldown=0.5)
    assert await verifier.verify(_token(rsa_keys[0], "k1"))
    for n in range(20):  # a burst of made-up key ids: no fetch per token
        with pytest.raises(Unauthorized, match="signing key"):
            await verifier.verify(_token(rsa_keys[1], f"made-up-{n}"))
    assert served.fetches == 1
    served.keys["k2"] = rsa_keys[1]  # a newly rotated-in key
    await asyncio.sleep(0.6)
    assert await verifier.verify(_token(rsa_keys[1], "k2"))  # fetched again for it
    assert served.fetches == 2
    for n in range(20):
        with pytest.raises(Unauthorized):
            await verifier.verify(_token(rsa_keys[1], f"other-{n}"))
    assert served.fetches == 2


async def test_a_jwks_that_does_not_answer_is_a_503_after_the_timeout(jwks, rsa_keys) -> None:
    url, served = jwks
    served.keys = {"k1": rsa_keys[0]}
    served.hang.set()
    verifier = _verifier(url, jwks_timeout=0.5)
    started = time.perf_counter()
    with pytest.raises(SigningKeysUnavailable) as raised:
        await verifier.verify(_token(rsa_keys[0], "k1"))
    assert time.perf_counter() - started < 2.5
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    # Right after a failed fetch, callers are told at once rather than waiting again.
    fetches = served.fetches
    started = time.perf_counter()
    with pytest.raises(SigningKeysUnavailable):
        await verifier.verify(_token(rsa_keys[0], "k1", sub="user-2"))
    assert time.perf_counter() - started < 0.3 and served.fetches == fetches


async def test_a_jwks_that_is_not_json_is_a_503(rsa_keys) -> None:
    app = Starlette(routes=[Route("/jwks", lambda request: Response("<html>oops</html>"))])
    server = ThreadedServer(app, free_port()).start()
    try:
        with pytest.raises(SigningKeysUnavailable):
            await _verifier(f"{server.url}/jwks").verify(_token(rsa_keys[0], "k1"))
    finally:
        server.stop()
