"""Key rotation: re-encrypt every stored secret under the first key, in batches, online."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.crypto import SecretBox
from service.domain import Sealed, revocation_aad, sealed_aad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretColumn:
    table: str
    key: str  # primary key column
    column: str
    aad: Callable[[sa.Row], str]  # type: ignore[type-arg]
    aad_columns: str = ""  # further columns the associated data needs


# Every place a ciphertext lives, with the associated data it was sealed with.
SECRET_COLUMNS = [
    SecretColumn("connections", "id", "access_token", lambda r: sealed_aad(r.id, Sealed.ACCESS)),
    SecretColumn("connections", "id", "refresh_token", lambda r: sealed_aad(r.id, Sealed.REFRESH)),
    SecretColumn(
        "pending_links",
        "connection_id",
        "access_token",
        lambda r: sealed_aad(r.connection_id, Sealed.PENDING_ACCESS),
    ),
    SecretColumn(
        "pending_links",
        "connection_id",
        "refresh_token",
        lambda r: sealed_aad(r.connection_id, Sealed.PENDING_REFRESH),
    ),
    SecretColumn(
        "pending_revocations",
        "id",
        "token",
        lambda r: revocation_aad(r.connection_id, r.id),
        aad_columns=", connection_id",
    ),
    SecretColumn(
        "held_grants",
        "ticket_hash",
        "access_token",
        lambda r: sealed_aad(r.connection_id, Sealed.HELD_ACCESS),
        aad_columns=", connection_id",
    ),
    SecretColumn(
        "held_grants",
        "ticket_hash",
        "refresh_token",
        lambda r: sealed_aad(r.connection_id, Sealed.HELD_REFRESH),
        aad_columns=", connection_id",
    ),
    SecretColumn(
        "authorization_states", "state_hash", "code_verifier", lambda r: f"authorization:{r.state_hash}:pkce"
    ),
    # service.events.delivery.secret_associated_data
    SecretColumn("webhook_endpoints", "id", "secret", lambda r: f"webhook_endpoint:{r.id}:secret"),
    SecretColumn(
        "webhook_endpoints", "id", "previous_secret", lambda r: f"webhook_endpoint:{r.id}:previous_secret"
    ),
]


async def count_secrets_by_key(session: AsyncSession) -> dict[str, int]:
    parts = [
        f"SELECT split_part({c.column}, '.', 1) AS kid FROM {c.table} "  # noqa: S608 (fixed names)
        f"WHERE {c.column} IS NOT NULL"
        for c in SECRET_COLUMNS
    ]
    rows = await session.execute(
        sa.text(f"SELECT kid, count(*) FROM ({' UNION ALL '.join(parts)}) s GROUP BY kid")  # noqa: S608
    )
    return {kid: count for kid, count in rows.all()}


async def unconfigured_key_ids(session: AsyncSession, configured: list[str]) -> dict[str, int]:
    """Key ids the stored secrets are sealed under that `configured` lacks, with their counts."""
    return {
        kid: count for kid, count in (await count_secrets_by_key(session)).items() if kid not in configured
    }


async def _rotate_batch(session: AsyncSession, box: SecretBox, col: SecretColumn, batch: int) -> int:
    rows = (
        await session.execute(
            sa.text(
                f"SELECT {col.key}{col.aad_columns}, {col.column} AS secret FROM {col.table} "  # noqa: S608 (fixed names)
                f"WHERE {col.column} IS NOT NULL AND split_part({col.column}, '.', 1) <> :kid "
                f"LIMIT :batch FOR UPDATE SKIP LOCKED"
            ),
            {"kid": box.primary_kid, "batch": batch},
        )
    ).all()
    for row in rows:
        aad = col.aad(row)
        resealed = box.encrypt(box.decrypt(row.secret, aad), aad)
        await session.execute(
            sa.text(f"UPDATE {col.table} SET {col.column} = :value WHERE {col.key} = :key"),  # noqa: S608
            {"value": resealed, "key": getattr(row, col.key)},
        )
    return len(rows)


async def rotate_keys(
    sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox, *, batch: int = 200, pause: float = 0.0
) -> int:
    """Re-encrypt until no secret remains under another key. Rows being refreshed right now are
    skipped (SKIP LOCKED) and picked up on a later pass. Returns how many were re-encrypted."""
    total = 0
    while True:
        moved = 0
        for col in SECRET_COLUMNS:
            while True:
                async with sessionmaker() as session, session.begin():
                    done = await _rotate_batch(session, box, col, batch)
                moved += done
                if done < batch:
                    break
                if pause:
                    await asyncio.sleep(pause)
        total += moved
        async with sessionmaker() as session:
            remaining = {
                k: n for k, n in (await count_secrets_by_key(session)).items() if k != box.primary_kid
            }
        if not remaining:
            log.info("key rotation finished: %d secrets re-encrypted under %s", total, box.primary_kid)
            return total
        if moved == 0:
            await asyncio.sleep(0.2)  # only locked rows remain; let their holders finish
