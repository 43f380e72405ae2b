"""The qbo-broker command, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import jwt

from tests.conftest import ENCRYPTION_KEY, JWT_SECRET


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "INTUIT_", "DATABASE_"))}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


def test_api_key_create_list_revoke(stack, client) -> None:
    env = {"DATABASE_URL": stack.database_url}
    created = run(
        "api-key", "create", "--name", "billing", "--scope", "tokens:read", "--scope", "status:read", env=env
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("qbk_") and " " not in key
    listed = run("api-key", "list", env=env)
    assert "billing" in listed.stdout and key not in listed.stdout
    key_id = listed.stdout.split()[0]
    works = httpx.get(f"{stack.broker_url}/status", params={"tenant_id": "t"}, headers={"X-API-Key": key})
    assert works.status_code == 200
    revoked = run("api-key", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    refused = httpx.get(f"{stack.broker_url}/status", params={"tenant_id": "t"}, headers={"X-API-Key": key})
    assert refused.status_code == 401
    bad_scope = run("api-key", "create", "--name", "x", "--scope", "everything", env=env)
    assert bad_scope.returncode == 2 and "everything" in bad_scope.stderr


def test_dev_token_is_accepted_by_the_broker(stack) -> None:
    out = run("dev-token", "--tenant", "tenant-q", "--user", "u-7", env={"BROKER_JWT_SECRET": JWT_SECRET})
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["tenant_id"] == "tenant-q" and claims["sub"] == "u-7" and claims["exp"]
    listed = httpx.get(f"{stack.broker_url}/connections", headers={"Authorization": f"Bearer {token}"})
    assert listed.status_code == 200


def test_serve_refuses_to_start_without_keys_and_secrets(tmp_path) -> None:
    out = run("serve", "--port", "0", env={"BROKER_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    for name in ("BROKER_ENCRYPTION_KEYS", "INTUIT_CLIENT_ID", "BROKER_JWT_SECRET"):
        assert name in out.stderr
    assert "Traceback" not in out.stderr
    malformed = run(
        "serve",
        env={
            "BROKER_DATA_DIR": str(tmp_path),
            "BROKER_ENCRYPTION_KEYS": "k1:short",
            "INTUIT_CLIENT_ID": "a",
            "INTUIT_CLIENT_SECRET": "b",
            "BROKER_JWT_SECRET": JWT_SECRET,
        },
    )
    assert malformed.returncode == 2 and "32 bytes" in malformed.stderr or "base64" in malformed.stderr


def test_migrate_is_idempotent(stack) -> None:
    out = run("migrate", env={"DATABASE_URL": stack.database_url})
    assert out.returncode == 0, out.stderr
    from service.core.db.migrations import head_revision

    assert f"database at {head_revision()}" in out.stdout


def test_generate_key_makes_a_usable_entry() -> None:
    from service.core.config import Settings

    out = run("generate-key", "--kid", "2026a")
    entry = out.stdout.strip()
    assert entry.startswith("2026a:")
    keys = Settings(BROKER_ENCRYPTION_KEYS=f"{entry},{ENCRYPTION_KEY}").parsed_encryption_keys
    assert [kid for kid, _ in keys] == ["2026a", "k1"] and len(keys[0][1]) == 32


async def test_worker_alone_keeps_links_alive_and_stops_on_sigterm(stack, linked) -> None:
    """`qbo-broker worker` does the background work in a process of its own (the test broker
    runs none), and a SIGTERM ends it cleanly."""
    import asyncio
    import signal

    from tests.support.db_helpers import execute, fetchrow
    from tests.support.waiting import until

    cid = await linked()
    await execute(
        stack.database_url,
        "UPDATE connections SET keepalive_due_at = now() - interval '1 minute' WHERE id = $1",
        cid,
    )
    before = await fetchrow(
        stack.database_url, "SELECT last_refreshed_at FROM connections WHERE id = $1", cid
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "INTUIT_", "DATABASE_"))}
    settings = stack.settings
    env = {
        **base,
        "DATABASE_URL": stack.database_url,
        "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
        "INTUIT_CLIENT_ID": settings.intuit_client_id or "",
        "INTUIT_CLIENT_SECRET": settings.intuit_client_secret or "",
        "INTUIT_DISCOVERY_URL": settings.intuit_discovery_url or "",
        "INTUIT_API_BASE_URL": settings.intuit_api_base_url or "",
        "BROKER_BACKGROUND_INTERVAL": "0.2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "worker",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def refreshed() -> bool:
            row = await fetchrow(
                stack.database_url,
                "SELECT last_refreshed_at, keepalive_due_at > "
                "now() AS rescheduled FROM connections WHERE id = $1",
                cid,
            )
            return bool(row["rescheduled"]) and row["last_refreshed_at"] != before["last_refreshed_at"]

        await until(refreshed, "the worker to refresh the due connection", within=30)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr


def test_worker_refuses_to_start_without_keys(tmp_path) -> None:
    out = run("worker", env={"BROKER_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    for name in ("BROKER_ENCRYPTION_KEYS", "INTUIT_CLIENT_ID"):
        assert name in out.stderr
    assert "Traceback" not in out.stderr
