"""The Alembic migrations are the schema: they match the models and go down and up cleanly."""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import make_url

from alembic import command
from service.core.db.migrations import alembic_config, head_revision, upgrade_to_head
from tests.support import database
from tests.support.db_helpers import fetchrow


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
    from tests.support.db_helpers import execute

    await execute(stack.database_url, "UPDATE alembic_version SET version_num = 'behind'")
    try:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["expected_migration"] == head_revision()
    finally:
        await execute(stack.database_url, "UPDATE alembic_version SET version_num = $1", head_revision())
