"""The Alembic migrations are the schema: they match the models and go down and up cleanly."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

from sqlalchemy.engine import make_url

from alembic import command
from service.core.db.migrations import alembic_config, head_revision, upgrade_to_head
from tests.support import database
from tests.support.db_helpers import execute, fetch, fetchrow


def test_models_match_the_migrations(database_url: str) -> None:
    # Raises when autogenerate would produce a new migration, i.e. a model changed without one.
    command.check(alembic_config(database_url))


async def test_downgrade_and_upgrade_round_trip(database_url: str) -> None:
    admin = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    scratch = await database.create_database(admin)
    try:
        await asyncio.to_thread(upgrade_to_head, scratch)
        row = await fetchrow(scratch, "SELECT version_num FROM alembic_version")
        assert row["version_num"] == head_revision()
        await asyncio.to_thread(command.downgrade, alembic_config(scratch), "base")
        assert (await fetchrow(scratch, "SELECT to_regclass('connections') AS t"))["t"] is None
        await asyncio.to_thread(upgrade_to_head, scratch)
        assert (await fetchrow(scratch, "SELECT to_regclass('connections') AS t"))["t"] == "connections"
    finally:
        await database.drop_database(admin, scratch)


async def test_readyz_reports_a_database_behind_head(client, stack) -> None:
    await execute(stack.database_url, "UPDATE alembic_version SET version_num = 'behind'")
    try:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["expected_migration"] == head_revision()
    finally:
        await execute(stack.database_url, "UPDATE alembic_version SET version_num = $1", head_revision())


async def test_refresh_attempts_move_to_their_table_and_back(database_url: str) -> None:
    admin = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    scratch = await database.create_database(admin)
    config = alembic_config(scratch)
    issued = datetime(2026, 11, 30, 8, 15, 30, 123456, tzinfo=UTC)
    try:
        await asyncio.to_thread(command.upgrade, config, "0008")
        cid = uuid.uuid4()
        await execute(
            scratch, "INSERT INTO connections (id, tenant_id, status) VALUES ($1, 't', 'connected')", cid
        )
        # Attempts as the refresher recorded them (jsonb_build_object's form) and as earlier
        # versions did (Python's isoformat), beside an event that is history.
        for details in (
            '{"refresh_token_issued_at": "2026-11-30T08:15:30.123456+00:00"}',
            json.dumps({"refresh_token_issued_at": issued.isoformat()}),
            '{"refresh_token_issued_at": null}',
        ):
            await execute(
                scratch,
                "INSERT INTO connection_events (connection_id, tenant_id, type, actor, details) "
                "VALUES ($1, 't', 'refresh_attempt', 'keepalive', $2::jsonb)",
                cid,
                details,
            )
        await execute(
            scratch,
            "INSERT INTO connection_events (connection_id, tenant_id, type, actor, details) "
            "VALUES ($1, 't', 'refreshed', 'request', '{}')",
            cid,
        )

        await asyncio.to_thread(command.upgrade, config, "0009")
        moved = await fetch(
            scratch, "SELECT connection_id, refresh_token_issued_at, actor FROM refresh_attempts ORDER BY id"
        )
        assert [tuple(r) for r in moved] == [
            (cid, issued, "keepalive"),
            (cid, issued, "keepalive"),
            (cid, None, "keepalive"),
        ]
        left = await fetch(scratch, "SELECT type FROM connection_events")
        assert [r["type"] for r in left] == ["refreshed"]

        await asyncio.to_thread(command.downgrade, config, "0008")
        back = await fetch(
            scratch,
            "SELECT type, tenant_id, actor, (details->>'refresh_token_issued_at')::timestamptz AS issued "
            "FROM connection_events ORDER BY id",
        )
        assert [tuple(r) for r in back] == [
            ("refreshed", "t", "request", None),
            ("refresh_attempt", "t", "keepalive", issued),
            ("refresh_attempt", "t", "keepalive", issued),
            ("refresh_attempt", "t", "keepalive", None),
        ]
        assert (await fetchrow(scratch, "SELECT to_regclass('refresh_attempts') AS t"))["t"] is None
    finally:
        await database.drop_database(admin, scratch)
