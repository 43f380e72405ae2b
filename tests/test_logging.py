"""Logs are JSON with a request id, and no secret ever reaches a log line."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from service.auth.jwt import issue_dev_token
from service.core.observability import (
    MAX_LOGGED_PATH,
    ConsoleFormatter,
    JSONFormatter,
    configure_logging,
    loggable_path,
    redact,
    request_id_var,
)
from tests.conftest import CLIENT_SECRET, JWT_SECRET, user_headers
from tests.support.db_helpers import expire_access_token
from tests.support.logs import captured_json_logs


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    with captured_json_logs(logging.DEBUG) as stream:
        yield stream


async def test_canary_secrets_never_reach_the_logs(
    client, new_connection, connect, service_headers, emulator, stack, captured_logs
) -> None:
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
    await emulator.post("/faults", json={"endpoint": "token", "kind": "status", "status": 503, "count": 3})
    await client.get(f"/connections/{conn['id']}/token", params={"force_refresh": "true"}, headers=headers)
    await emulator.post("/companies/9341452988354102/disconnect")
    await client.get(f"/connections/{conn['id']}/token", params={"force_refresh": "true"}, headers=headers)

    text = captured_logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(lines) > 10
    canaries = {
        "authorization code": callback["code"][0],
        "state": callback["state"][0],
        "access token 1": first["access_token"],
        "access token 2": second["access_token"],
        "api key": headers["X-API-Key"],
        "user jwt": jwt,
        "client secret": CLIENT_SECRET,
    }
    for name, secret in canaries.items():
        assert secret not in text, f"{name} leaked into the logs"
    requests = [line for line in lines if line["logger"] == "qbo_broker.access"]
    assert requests and all(line["request_id"] for line in requests)
    # Intuit's transaction id is on every line about a token, revoke, userinfo or CompanyInfo call
    # (not on the published documents: discovery and the signing keys, fetched once per process,
    # so in this test only when it runs first).
    intuit_lines = [
        line
        for line in lines
        if "intuit_path" in line
        and "well-known" not in line["intuit_path"]
        and not line["intuit_path"].endswith("/jwks")
    ]
    assert intuit_lines, "no log line about Intuit calls"
    missing = [line for line in intuit_lines if not line.get("intuit_tid")]
    assert not missing, [line["intuit_path"] for line in missing]


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


def test_redaction_removes_real_secrets() -> None:
    jwt = issue_dev_token(JWT_SECRET, tenant_id="t", user_id="u")
    key = "qbk_0123abcd_" + "Zk9-_x" * 7
    cases = {
        f"Authorization: Bearer {jwt}": jwt,
        f"authorization=bearer {jwt}": jwt,
        f"GET /connections/{jwt}": jwt,  # a JWT anywhere, in a path too
        f"a token ({jwt}) in a sentence": jwt,
        f"id_token={jwt}&x=1": jwt,
        f"X-API-Key: {key}": key,
        f"key {key} used": key,
        "/callback?code=AB12-cd34_ef&state=s7a8t9e&realmId=1": "AB12-cd34_ef",
        "/callback?state=s7a8t9e&code=AB12": "s7a8t9e",
        '{"refresh_token": "RT-1234", "access_token":"AT-5678"}': "RT-1234",
        "{'access_token': 'AT-5678'}": "AT-5678",
        "client_secret=cs-9999": "cs-9999",
        "password: hunter2": "hunter2",
        "x_access_token=AT-5678": "AT-5678",
    }
    for text, secret in cases.items():
        assert secret not in redact(text), text
    assert "AT-5678" not in redact('{"refresh_token": "RT-1234", "access_token":"AT-5678"}')


def test_redaction_keeps_what_is_not_secret() -> None:
    assert redact("unhandled RuntimeError on GET /connections/{connection_id}/token") == (
        "unhandled RuntimeError on GET /connections/{connection_id}/token"
    )
    # A path segment named like a key is not a key: what follows it stays.
    assert redact("failed on GET /connections/abc/token: RuntimeError: boom") == (
        "failed on GET /connections/abc/token: RuntimeError: boom"
    )
    assert redact("GET /connections/abc/token 200") == "GET /connections/abc/token 200"


# Texts shaped to make a backtracking pattern retry from every position: each is about 60 KB,
# the size of the request path that once stalled the broker for seconds.
PATHOLOGICAL = {
    "eyJ repeated": "eyJ" * 20_000,
    "eyJ runs between dots": ("eyJ" * 50 + ".") * 400,
    "a JWT missing its last dot": "eyJ" + "a" * 30_000 + "." + "b" * 30_000,
    "token= repeated": "token=" * 10_000,
    "token: repeated": "token:" * 10_000,
    "keys followed by spaces": ("token" + " " * 50) * 1_100,
    "a key then spaces and no value": "access_token" + " " * 60_000 + "&",
    "Bearer repeated": "Bearer " * 8_500,
    "bearer then spaces": "bearer" + " " * 60_000 + "!",
    "API key prefixes": "qbk_0123abcd" * 5_000,
    "code=state=": "code=state=" * 5_500,
    "a path of them all": "/" + "/".join(["eyJ" * 300, "token=" * 100, "Bearer%20" * 100] * 20),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_redaction_is_linear_on_pathological_input(name: str) -> None:
    text = PATHOLOGICAL[name]
    for _attempt in range(3):  # a busy machine may pause a run; a quadratic one never passes
        started = time.perf_counter()
        redact(text)
        loggable_path(text)
        if time.perf_counter() - started < 0.25:
            return
    raise AssertionError(
        f"redacting {len(text)} characters ({name}) took {time.perf_counter() - started:.2f} s"
    )


def test_long_paths_are_cut_and_marked() -> None:
    jwt = issue_dev_token(JWT_SECRET, tenant_id="t", user_id="u")
    path = "/connections/" + "x" * (MAX_LOGGED_PATH - 20) + jwt
    logged = loggable_path(path)
    assert logged.startswith(path[: MAX_LOGGED_PATH - 20])
    assert logged.endswith(f"…[truncated, {len(path)} chars]")
    assert len(logged) < MAX_LOGGED_PATH + 40
    assert jwt[:40] not in logged  # redacted before the cut, so no part of it shows
    assert loggable_path("/status") == "/status"


async def test_a_pathological_path_does_not_stall_the_broker(client, captured_logs) -> None:
    path = "/" + "eyJ" * 20_000
    started = time.perf_counter()
    answer = await client.get(path)
    health = await client.get("/healthz")
    elapsed = time.perf_counter() - started
    assert answer.status_code == 404 and health.status_code == 200
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line.strip()]
    [logged] = [
        line
        for line in lines
        if line["logger"] == "qbo_broker.access" and line["request_id"] == answer.headers["x-request-id"]
    ]
    assert len(logged["path"]) < MAX_LOGGED_PATH + 40
    assert "truncated" in logged["path"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """configure_logging() rewires the process's loggers: put them back afterwards."""
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "pgserver"]
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        {
            n: (
                logging.getLogger(n).handlers[:],
                logging.getLogger(n).propagate,
                logging.getLogger(n).disabled,
                logging.getLogger(n).level,
            )
            for n in names
        },
    )
    try:
        yield
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, (handlers, propagate, disabled, level) in saved[2].items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate, logger.disabled = handlers, propagate, disabled
            logger.setLevel(level)


@pytest.mark.parametrize(
    ("stderr", "human_on_tty", "formatter"),
    [
        (Terminal(), True, ConsoleFormatter),  # `dev` on a terminal
        (io.StringIO(), True, JSONFormatter),  # `dev` piped or in a container
        (Terminal(), False, JSONFormatter),  # `serve`, wherever it runs
    ],
)
def test_readable_logs_only_for_dev_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
    logging_restored: None,
    stderr: io.StringIO,
    human_on_tty: bool,
    formatter: type[logging.Formatter],
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging("INFO", human_on_tty=human_on_tty)
    [handler] = logging.getLogger().handlers
    assert type(handler.formatter) is formatter


def test_readable_lines_are_redacted_and_carry_the_request_id() -> None:
    jwt = issue_dev_token(JWT_SECRET, tenant_id="t", user_id="u")
    record = logging.LogRecord(
        "service.oauth", logging.INFO, __file__, 1, "linked with Bearer %s", (jwt,), None
    )
    record.connection_id = "c-1"
    record.path = f"/callback?code=secret-code&state={jwt}"
    token = request_id_var.set("req-42")
    try:
        line = ConsoleFormatter().format(record)
    finally:
        request_id_var.reset(token)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d INFO  service\.oauth  linked with Bearer \[redacted\]  "
        r"connection_id=c-1 path=/callback\?code=\[redacted\]&state=\[redacted\]  "
        r"\[req-42\]",
        line,
    ), line
    assert jwt not in line and "secret-code" not in line


def test_dev_logs_are_readable_on_a_real_terminal() -> None:
    """`dev`'s logging set-up, in a process whose stderr is a pseudo-terminal."""
    script = (
        "import logging; from service.devserver import configure_dev_logging; "
        "configure_dev_logging('INFO'); "
        "logging.getLogger('service.oauth').info('linked', extra={'connection_id': 'c-1'})"
    )
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            stderr=terminal,
            stdout=subprocess.DEVNULL,
            timeout=60,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            output += chunk
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)
    assert done.returncode == 0, output
    text = output.decode().replace("\r\n", "\n")
    assert re.search(
        r"^\d\d:\d\d:\d\d INFO  service\.oauth  linked  connection_id=c-1$", text, re.MULTILINE
    ), text
    assert "{" not in text
