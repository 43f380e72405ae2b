"""The RSA key that signs the emulator's id_tokens, its JWKS form and id_token signing."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Generating a 2048-bit key costs ~100 ms; tests build many apps in one process, so apps that do
# not persist their key share one generated per process (each app still has exactly one kid).
_process_key: rsa.RSAPrivateKey | None = None


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SigningKey:
    """One RS256 key with a stable kid derived from its public half."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key = private_key
        numbers = private_key.public_key().public_numbers()
        self._n = _b64url_uint(numbers.n)
        self._e = _b64url_uint(numbers.e)
        # RFC 7638 thumbprint, shortened: stable across restarts when the key is persisted.
        canonical = f'{{"e":"{self._e}","kty":"RSA","n":"{self._n}"}}'.encode()
        self.kid = hashlib.sha256(canonical).hexdigest()[:20]

    @classmethod
    def generate(cls) -> SigningKey:
        global _process_key
        if _process_key is None:
            _process_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(_process_key)

    @classmethod
    def from_pem(cls, pem: str) -> SigningKey:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the emulator's state file holds a signing key that is not RSA")
        return cls(key)

    def to_pem(self) -> str:
        return self._key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ).decode("ascii")

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {"kty": "RSA", "e": self._e, "use": "sig", "kid": self.kid, "alg": "RS256", "n": self._n}
            ]
        }

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
