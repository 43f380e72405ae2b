"""Alembic environment: async, serialized across replicas by a PostgreSQL advisory lock."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from alembic import context
from service.core.db import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from service.core.db.engine import async_url
from service.core.db.locking import MIGRATION_LOCK_KEY
from service.events import models as event_models  # noqa: F401  (the same)
from service.intuit_webhooks import models as intuit_webhook_models  # noqa: F401

config = context.config
target_metadata = SQLModel.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.core.config import Settings
    from service.core.db.embedded import start_embedded_postgres

    settings = Settings()
    return settings.database_url or start_embedded_postgres(settings.data_dir)


def _run(connection: Connection) -> None:
    # Replicas starting together take turns; the later ones find the schema at head.
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


async def _run_online() -> None:
    engine = create_async_engine(async_url(_database_url()))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
