"""The streams' reads of the events table (plain asyncpg: the hub's hot, single statements)."""

from __future__ import annotations

import uuid

import asyncpg

_READ_AFTER = (
    "SELECT seq, id, type, occurred_at, tenant_id, connection_id, data FROM events"
    " WHERE seq > $1 OR seq = ANY($2::bigint[]) ORDER BY seq LIMIT $3"
)
_TENANT_AFTER = (
    "SELECT seq, id, type, occurred_at, tenant_id, connection_id, data FROM events"
    " WHERE tenant_id = $1 AND seq > $2 AND ($3::uuid IS NULL OR connection_id = $3::uuid)"
    " AND type LIKE $4 ORDER BY seq LIMIT $5"
)


async def latest_seq(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events"))


async def read_after(
    conn: asyncpg.Connection, *, after: int, watched: list[int], limit: int
) -> list[asyncpg.Record]:
    """Every event above `after`, and those of the `watched` seqs (gaps) that exist now."""
    return list(await conn.fetch(_READ_AFTER, after, watched, limit))


async def seq_of(conn: asyncpg.Connection, *, event_id: uuid.UUID, tenant_id: str) -> int | None:
    """The seq of one of the tenant's events; None for an unknown or another tenant's id."""
    seq = await conn.fetchval("SELECT seq FROM events WHERE id = $1 AND tenant_id = $2", event_id, tenant_id)
    return None if seq is None else int(seq)


async def tenant_events_after(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    after: int,
    connection_id: uuid.UUID | None,
    type_prefix: str,
    limit: int,
) -> list[asyncpg.Record]:
    return list(await conn.fetch(_TENANT_AFTER, tenant_id, after, connection_id, type_prefix + "%", limit))
