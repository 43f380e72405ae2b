"""A stored secret under an encryption key this process lacks (or one that does not open) stops
neither the background worker nor the other rows; revocations are never dropped for it; `serve`
refuses to start without every stored key id."""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from typing import Any

from prometheus_client import REGISTRY

from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.db.engine import build_engine, build_sessionmaker
from service.tokens.revocation import queue_revocation, retry_pending_revocations
from service.worker import BackgroundWorker, expire_pending_links
from tests.conftest import ENCRYPTION_KEY, JWT_SECRET, Stack
from tests.support.db_helpers import execute, fetchrow
from tests.test_cli import run

OTHER_KEY = "k9:" + base64.b64encode(bytes(range(100, 132))).decode()
TAMPERED = "k1." + base64.urlsafe_b64encode(b"\x00" * 40).decode()


def _box(*entries: str) -> SecretBox:
    return SecretBox(Settings(BROKER_ENCRYPTION_KEYS=",".join(entries)).parsed_encryption_keys)  # type: ignore[call-arg]


def _errors(task: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "qbo_broker_background_row_errors_total", {"task": task, "reason": reason}
    )
    return value or 0.0


async def _connection(stack: Stack, box: SecretBox | None, *, refresh: str | None = None) -> str:
    """A connected connection, due for keep-alive, its tokens sealed with `box` (or `refresh`
    stored as is)."""
    cid = str(uuid.uuid4())
    access = box.encrypt("access-" + cid, f"{cid}:access") if box else TAMPERED
    sealed = box.encrypt("refresh-" + cid, f"{cid}:refresh") if box else (refresh or TAMPERED)
    await execute(
        stack.database_url,
        """
        INSERT INTO connections (id, tenant_id, status, realm_id, access_token, refresh_token,
            access_token_expires_at, refresh_token_expires_at, refresh_token_issued_at,
            keepalive_due_at)
        VALUES ($1, 'tenant-k', 'connected', $2, $3, $4, now() + interval '1 hour',
                now() + interval '90 days', now() - interval '2 days', now() - interval '1 minute')
        """,
        uuid.UUID(cid),
        str(abs(hash(cid)) % 10**12),
        access,
        sealed,
    )
    return cid


async def _pending_link(stack: Stack, box: SecretBox) -> str:
    """A pending connection with a pending link that expired a second ago, sealed with `box`."""
    cid = str(uuid.uuid4())
    await execute(
        stack.database_url,
        "INSERT INTO connections (id, tenant_id, status) VALUES ($1, 'tenant-k', 'pending')",
        uuid.UUID(cid),
    )
    await execute(
        stack.database_url,
        """
        INSERT INTO pending_links (connection_id, user_id, reasons, qb_sub, realm_id, access_token,
            refresh_token, access_token_expires_at, refresh_token_expires_at, expires_at)
        VALUES ($1, 'user-1', ARRAY['different_quickbooks_company'], 'sub-1', '4242', $2, $3,
                now() + interval '1 hour', now() + interval '90 days', now() - interval '1 second')
        """,
        uuid.UUID(cid),
        box.encrypt("pa-" + cid, f"{cid}:pending-access"),
        box.encrypt("pr-" + cid, f"{cid}:pending-refresh"),
    )
    return cid


async def _revocation(stack: Stack, box: SecretBox, token: str, *, stored: str | None = None) -> str:
    engine = build_engine(stack.database_url, pool_size=1)
    try:
        async with build_sessionmaker(engine)() as session, session.begin():
            queue_revocation(session, box, connection_id=uuid.uuid4(), token=token, reason="test")
    finally:
        await engine.dispose()
    row = await fetchrow(
        stack.database_url, "SELECT id FROM pending_revocations ORDER BY created_at DESC LIMIT 1"
    )
    assert row is not None
    if stored is not None:
        await execute(
            stack.database_url, "UPDATE pending_revocations SET token = $2 WHERE id = $1", row["id"], stored
        )
    await execute(
        stack.database_url,
        "UPDATE pending_revocations SET next_attempt_at = now() - interval '1 second' WHERE id = $1",
        row["id"],
    )
    return str(row["id"])


async def _revocation_row(stack: Stack, rid: str) -> Any:
    return await fetchrow(
        stack.database_url,
        "SELECT attempts, last_error, next_attempt_at > now() "
        "AS later FROM pending_revocations WHERE id = $1",
        uuid.UUID(rid),
    )


async def test_one_bad_row_stops_nothing(linked, runtime, stack: Stack, caplog) -> None:
    ours, theirs = runtime.box, _box(OTHER_KEY)
    good = await linked()
    await execute(
        stack.database_url,
        "UPDATE connections SET keepalive_due_at = now() - interval '1 minute' WHERE id = $1",
        uuid.UUID(good),
    )
    foreign_conn = await _connection(stack, theirs)
    tampered_conn = await _connection(stack, None)
    good_link, foreign_link = await _pending_link(stack, ours), await _pending_link(stack, theirs)
    good_rev = await _revocation(stack, ours, "token-ours")
    foreign_rev = await _revocation(stack, theirs, "token-theirs")
    tampered_rev = await _revocation(stack, ours, "token-x", stored=TAMPERED)
    before = {
        (task, reason): _errors(task, reason)
        for task in ("keepalive", "pending_link", "revocation")
        for reason in ("unknown_key", "undecryptable")
    }

    with caplog.at_level(logging.INFO):
        done = await BackgroundWorker(runtime).run_once()

    assert done == {
        "refreshed": 1,
        "pending_links_expired": 1,
        "completion_tickets_expired": 0,
        "revocations": 1,
        "unknown_key_rows": 3,
    }
    # The good rows were all done.
    assert (
        await fetchrow(
            stack.database_url,
            "SELECT last_refreshed_at > now() - interval '1 minute' AS fresh FROM connections WHERE id = $1",
            uuid.UUID(good),
        )
    )["fresh"]
    assert (
        await fetchrow(
            stack.database_url, "SELECT 1 FROM pending_links WHERE connection_id = $1", uuid.UUID(good_link)
        )
        is None
    )
    assert await _revocation_row(stack, good_rev) is None
    # The others are kept: untouched when sealed under a key this process lacks, retried later
    # when they do not open.
    assert (
        await fetchrow(
            stack.database_url,
            "SELECT 1 FROM pending_links WHERE connection_id = $1",
            uuid.UUID(foreign_link),
        )
        is not None
    )
    foreign = await _revocation_row(stack, foreign_rev)
    assert foreign is not None and foreign["attempts"] == 0
    tampered = await _revocation_row(stack, tampered_rev)
    assert tampered is not None and (tampered["attempts"], tampered["last_error"], tampered["later"]) == (
        1,
        "DecryptionError",
        True,
    )
    for cid in (foreign_conn, tampered_conn):
        row = await fetchrow(
            stack.database_url, "SELECT status FROM connections WHERE id = $1", uuid.UUID(cid)
        )
        assert row is not None and row["status"] == "connected"
    # Counted and logged, by key id and row id, without secrets.
    after = {key: _errors(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("keepalive", "unknown_key"): 1,
        ("keepalive", "undecryptable"): 1,
        ("pending_link", "unknown_key"): 1,
        ("pending_link", "undecryptable"): 0,
        ("revocation", "unknown_key"): 1,
        ("revocation", "undecryptable"): 1,
    }
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "'k9'" in logged and tampered_conn in logged and tampered_rev in logged
    assert "token-" not in logged and TAMPERED not in logged and OTHER_KEY.split(":")[1] not in logged

    # A replica that has the key does them.
    both = dataclasses.replace(runtime, box=_box(ENCRYPTION_KEY, OTHER_KEY))
    assert await expire_pending_links(both) == 1
    assert await retry_pending_revocations(both.sessionmaker, both.intuit, both.box) == 1
    assert await _revocation_row(stack, foreign_rev) is None
    assert await _revocation_row(stack, tampered_rev) is not None  # never dropped


async def test_serve_refuses_to_start_without_every_stored_key_id(stack: Stack, tmp_path) -> None:
    await _connection(stack, _box(OTHER_KEY))
    await _revocation(stack, _box(OTHER_KEY), "token-theirs")
    env = {
        "DATABASE_URL": stack.database_url,
        "BROKER_DATA_DIR": str(tmp_path),
        "INTUIT_CLIENT_ID": "id",
        "INTUIT_CLIENT_SECRET": "secret",
        "BROKER_JWT_SECRET": JWT_SECRET,
        "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
    }
    out = run("serve", "--port", "0", env=env)
    assert out.returncode == 2, out.stderr
    assert "k9 (3 secrets)" in out.stderr and "configured key ids: k1" in out.stderr
    assert OTHER_KEY.split(":")[1] not in out.stderr and ENCRYPTION_KEY.split(":")[1] not in out.stderr
    assert "Traceback" not in out.stderr
