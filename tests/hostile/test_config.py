"""Configuration `serve` refuses: RS256 without issuer and audience, production Intuit URLs
over plain http."""

from __future__ import annotations

from typing import Any

import pytest

from service.core.config import ConfigurationError, Settings
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ENCRYPTION_KEY, JWT_SECRET
from tests.test_cli import run

PEM = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
BASE = {
    "INTUIT_CLIENT_ID": CLIENT_ID,
    "INTUIT_CLIENT_SECRET": CLIENT_SECRET,
    "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
}


def _problems(**values: Any) -> str | None:
    try:
        Settings(**{**BASE, **values}).check_for_serving()
    except ConfigurationError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "source", [{"BROKER_JWT_PUBLIC_KEY": PEM}, {"BROKER_JWT_JWKS_URL": "https://id.example/jwks"}]
)
def test_rs256_needs_issuer_and_audience(source: dict[str, str]) -> None:
    for missing in ({}, {"BROKER_JWT_ISSUER": "https://id.example"}, {"BROKER_JWT_AUDIENCE": "qbo-broker"}):
        problems = _problems(**source, **missing)
        assert problems and "BROKER_JWT_ISSUER and BROKER_JWT_AUDIENCE are required" in problems
    assert (
        _problems(**source, BROKER_JWT_ISSUER="https://id.example", BROKER_JWT_AUDIENCE="qbo-broker") is None
    )
    # HS256 alone: the broker and the frontend share the secret; both checks stay optional.
    assert _problems(BROKER_JWT_SECRET=JWT_SECRET) is None


def test_production_intuit_overrides_must_be_https() -> None:
    production = {
        "INTUIT_ENVIRONMENT": "production",
        "BROKER_JWT_SECRET": JWT_SECRET,
        "BROKER_PUBLIC_URL": "https://qbo-broker.example.com",
    }
    assert _problems(**production) is None
    problems = _problems(
        **production,
        INTUIT_DISCOVERY_URL="http://intuit.example/.well-known/x",
        INTUIT_API_BASE_URL="http://intuit.example",
    )
    assert problems is not None
    assert "INTUIT_DISCOVERY_URL must be https://" in problems
    assert "INTUIT_API_BASE_URL must be https://" in problems
    assert (
        _problems(
            **production,
            INTUIT_DISCOVERY_URL="https://intuit.example/.well-known/x",
            INTUIT_API_BASE_URL="https://intuit.example",
        )
        is None
    )
    # Sandbox may point at the local emulator.
    assert (
        _problems(
            BROKER_JWT_SECRET=JWT_SECRET,
            INTUIT_DISCOVERY_URL="http://127.0.0.1:9100/x",
            INTUIT_API_BASE_URL="http://127.0.0.1:9100",
        )
        is None
    )


def test_serve_says_so_at_startup(tmp_path) -> None:
    out = run(
        "serve",
        "--port",
        "0",
        env={
            **BASE,
            "BROKER_DATA_DIR": str(tmp_path),
            "BROKER_JWT_JWKS_URL": "https://id.example/jwks",
            "INTUIT_ENVIRONMENT": "production",
            "BROKER_PUBLIC_URL": "https://broker.example",
            "INTUIT_API_BASE_URL": "http://intuit.example",
        },
    )
    assert out.returncode == 2
    assert "BROKER_JWT_ISSUER and BROKER_JWT_AUDIENCE are required" in out.stderr
    assert "INTUIT_API_BASE_URL must be https://" in out.stderr
    assert "Traceback" not in out.stderr


def test_lifetime_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Settings(BROKER_JWT_MAX_LIFETIME_SECONDS=0)  # type: ignore[call-arg]
