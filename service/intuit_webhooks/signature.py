"""`intuit-signature`: base64(HMAC-SHA256(key = the app's verifier token, message = raw body))."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

# A SHA-256 digest is 32 bytes, 44 characters of base64; anything much longer is not one.
_MAX_HEADER = 128


def sign(token: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(token.encode(), body, hashlib.sha256).digest()).decode()


def verify(header: str | None, body: bytes, tokens: Sequence[str]) -> bool:
    """Whether `header` is the signature of `body` under one of `tokens` (during a rotation,
    the new and the old). Every token is compared, each in constant time."""
    if not header or len(header) > _MAX_HEADER or not tokens:
        return False
    try:
        given = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    matches = [
        hmac.compare_digest(given, hmac.new(token.encode(), body, hashlib.sha256).digest())
        for token in tokens
    ]
    return any(matches)
