"""AES-256-GCM secret storage: key ids, associated data, tampering, rotation order."""

from __future__ import annotations

import base64

import pytest

from service.core.config import ConfigurationError, Settings
from service.core.crypto import DecryptionError, SecretBox, generate_key


def _key(n: int) -> bytes:
    return bytes([n]) * 32


def test_round_trip_and_key_id() -> None:
    box = SecretBox([("a", _key(1))])
    sealed = box.encrypt("refresh-token-value", "conn-1:refresh")
    assert sealed.startswith("a.") and "refresh-token-value" not in sealed
    assert box.decrypt(sealed, "conn-1:refresh") == "refresh-token-value"
    assert sealed != box.encrypt("refresh-token-value", "conn-1:refresh")  # fresh nonce


def test_associated_data_binds_the_row_and_purpose() -> None:
    box = SecretBox([("a", _key(1))])
    sealed = box.encrypt("secret", "conn-1:refresh")
    for aad in ("conn-2:refresh", "conn-1:access"):
        with pytest.raises(DecryptionError):
            box.decrypt(sealed, aad)


def test_tampering_and_unknown_keys_are_refused() -> None:
    box = SecretBox([("a", _key(1))])
    sealed = box.encrypt("secret", "x")
    kid, _, body = sealed.partition(".")
    raw = bytearray(base64.urlsafe_b64decode(body))
    raw[-1] ^= 1
    with pytest.raises(DecryptionError):
        box.decrypt(f"{kid}.{base64.urlsafe_b64encode(bytes(raw)).decode()}", "x")
    with pytest.raises(DecryptionError):
        SecretBox([("b", _key(2))]).decrypt(sealed, "x")


def test_first_key_encrypts_all_decrypt() -> None:
    old = SecretBox([("old", _key(1))])
    rotated = SecretBox([("new", _key(2)), ("old", _key(1))])
    legacy = old.encrypt("v", "x")
    assert legacy.startswith("old.") and rotated.decrypt(legacy, "x") == "v"
    assert rotated.encrypt("v", "x").startswith("new.")


@pytest.mark.parametrize(
    "value,message",
    [
        ("", "required"),
        ("nokid", "kid:base64key"),
        ("a:!!!", "base64"),
        ("a:" + base64.b64encode(b"short").decode(), "32 bytes"),
        (f"a:{generate_key()},a:{generate_key()}", "repeats"),
        (f"a.b:{generate_key()}", "letters, digits"),
    ],
)
def test_bad_key_configuration_is_a_clear_error(value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _ = Settings(BROKER_ENCRYPTION_KEYS=value).parsed_encryption_keys
