"""Logs are JSON with a request id, and no secret ever reaches a log line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from service.observability import JSONFormatter, redact
from tests.conftest import CLIENT_SECRET, user_headers
from tests.support.db_helpers import expire_access_token


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("service").setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_canary_secrets_never_reach_the_logs(client, new_connection, connect, service_headers,
                                                   emulator, stack, captured_logs) -> None:
    headers = await service_headers("tokens:read")
    jwt = user_headers()["Authorization"].split()[1]
    conn = await new_connection()
    result = await connect(conn["id"])
    callback = parse_qs(urlsplit(result.callback_url).query)
    first = (await client.get(f"/connections/{conn['id']}/token", headers=headers)).json()
    await expire_access_token(stack.database_url, conn["id"])
    second = (await client.get(f"/connections/{conn['id']}/token", headers=headers)).json()
    # Failures log too: a forged callback, a bad key, an Intuit outage, a revoked grant.
    await client.get("/callback", params={"code": callback["code"][0], "state": callback["state"][0]})
    await client.get("/connections", headers={"X-API-Key": headers["X-API-Key"] + "x"})
    await emulator.post("/faults", json={"endpoint": "token", "kind": "status", "status": 503,
                                         "count": 3})
    await client.get(f"/connections/{conn['id']}/token", params={"force_refresh": "true"},
                     headers=headers)
    await emulator.post("/companies/9341452988354102/disconnect")
    await client.get(f"/connections/{conn['id']}/token", params={"force_refresh": "true"},
                     headers=headers)

    text = captured_logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(lines) > 10
    canaries = {
        "authorization code": callback["code"][0], "state": callback["state"][0],
        "access token 1": first["access_token"], "access token 2": second["access_token"],
        "api key": headers["X-API-Key"], "user jwt": jwt, "client secret": CLIENT_SECRET,
    }
    for name, secret in canaries.items():
        assert secret not in text, f"{name} leaked into the logs"
    requests = [line for line in lines if line["logger"] == "qbo_broker.access"]
    assert requests and all(line["request_id"] for line in requests)
    # Intuit's transaction id is on every line about a token, revoke, userinfo or CompanyInfo call.
    intuit_lines = [line for line in lines if "intuit_path" in line
                    and "well-known" not in line["intuit_path"]]
    assert intuit_lines, "no log line about Intuit calls"
    missing = [line for line in intuit_lines if not line.get("intuit_tid")]
    assert not missing, missing


async def test_request_id_is_echoed_or_made(client) -> None:
    mine = await client.get("/healthz", headers={"X-Request-ID": "req-123"})
    assert mine.headers["x-request-id"] == "req-123"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces" and len(made.headers["x-request-id"]) == 32


def test_redaction_patterns() -> None:
    assert "abc123" not in redact("refresh_token=abc123&x=1")
    assert "s3cr3t" not in redact('{"access_token": "s3cr3t"}')
    assert "AAAA.BBBB" not in redact("Authorization: Bearer AAAA.BBBB")
    assert "qbk_0123abcd_zzz" not in redact("key qbk_0123abcd_zzz used")
