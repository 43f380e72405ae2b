"""AES-256-GCM for stored secrets, with a key id per ciphertext so keys can rotate online."""

from __future__ import annotations

import base64
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")  # as BROKER_ENCRYPTION_KEYS allows (service.core.config)


def printable_key_id(kid: str) -> str:
    """A key id read from a stored ciphertext, fit for a log line or an error message: as
    configured ids look, or else not echoed (it could be a malformed value's whole text)."""
    return kid if _KEY_ID.fullmatch(kid) else "<malformed>"


class DecryptionError(Exception):
    """A ciphertext could not be opened: unknown key id, wrong associated data, or tampering."""


class SecretBox:
    """Encrypts under the first key; decrypts under any configured key.

    Ciphertexts read `kid.base64url(nonce || ciphertext+tag)`. The associated data binds each
    ciphertext to its row and purpose, so a value copied to another connection does not open.
    """

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._primary_kid = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}

    @property
    def primary_kid(self) -> str:
        return self._primary_kid

    @property
    def key_ids(self) -> list[str]:
        """Every configured key id, the encrypting one first."""
        return list(self._ciphers)

    def encrypt(self, plaintext: str, associated_data: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._primary_kid].encrypt(nonce, plaintext.encode(), associated_data.encode())
        return f"{self._primary_kid}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def decrypt(self, ciphertext: str, associated_data: str) -> str:
        kid, _, encoded = ciphertext.partition(".")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptionError(f"no key with id {kid!r} is configured")
        try:
            raw = base64.urlsafe_b64decode(encoded)
            opened = cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated_data.encode())
        except (InvalidTag, ValueError):
            raise DecryptionError("ciphertext does not open under its key") from None
        return opened.decode()


def generate_key() -> str:
    """A fresh 32-byte key, base64-encoded, for BROKER_ENCRYPTION_KEYS."""
    return base64.b64encode(os.urandom(32)).decode()
