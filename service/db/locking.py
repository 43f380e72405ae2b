"""PostgreSQL advisory locks: the primitive for "only one of these, anywhere"."""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Fixed 64-bit keys; distinct namespaces so two kinds of lock never collide.
MIGRATION_LOCK_KEY = 0x5142_4F42_4D49_4752  # "QBOBMIGR"


def lock_key(namespace: str, entity_id: uuid.UUID | str) -> int:
    digest = hashlib.blake2b(f"{namespace}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def try_advisory_xact_lock(session: AsyncSession, namespace: str,
                                 entity_id: uuid.UUID | str) -> bool:
    """Take a transaction-scoped lock if free; released at commit/rollback or if the process dies."""
    result = await session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                   {"key": lock_key(namespace, entity_id)})
    return bool(result.scalar_one())
