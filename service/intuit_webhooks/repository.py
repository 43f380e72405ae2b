"""Every SQL statement on Intuit's notifications and the entity changes seen."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.intuit_webhooks.models import IntuitEntityChange, IntuitNotification
from service.intuit_webhooks.payloads import EntityChange

N = IntuitNotification.__table__.c  # type: ignore[attr-defined]
K = IntuitEntityChange.__table__.c  # type: ignore[attr-defined]

_STORE = "INSERT INTO intuit_notifications (body) VALUES ($1)"


async def store(pool: asyncpg.Pool, body: bytes) -> None:
    """Keep a verified notification: one statement in autocommit on the plain pool, so the
    intake answers Intuit within milliseconds (service.intuit_webhooks.waker then wakes the
    processors)."""
    await pool.execute(_STORE, body)


@dataclass(frozen=True)
class Claimed:
    id: int
    body: bytes
    received_at: datetime
    attempts: int


async def claim(session: AsyncSession, *, limit: int) -> list[Claimed]:
    """Unprocessed notifications, oldest first, locked for this transaction; those another
    replica holds are skipped (it is processing them)."""
    rows = (
        await session.execute(
            sa.select(N.id, N.body, N.received_at, N.attempts)
            .where(N.processed_at.is_(None))
            .order_by(N.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return [Claimed(row.id, row.body, row.received_at, row.attempts) for row in rows]


async def first_seen(
    session: AsyncSession, changes: Sequence[tuple[int, EntityChange]], outcomes: dict[EntityChange, str]
) -> set[tuple[Any, ...]]:
    """Record the changes (with the notification that brought them); the keys of those not
    seen before. Inserted in key order, so that replicas recording overlapping changes wait for
    each other in one order and never deadlock."""
    if not changes:
        return set()
    unique: dict[tuple[Any, ...], dict[str, Any]] = {}
    for notification_id, c in changes:
        key = (c.realm_id, c.entity, c.entity_id, c.operation, c.occurred_second)
        unique.setdefault(
            key,
            {
                "realm_id": c.realm_id,
                "entity": c.entity,
                "entity_id": c.entity_id,
                "operation": c.operation,
                "occurred_second": c.occurred_second,
                "notification_id": notification_id,
                "outcome": outcomes[c],
            },
        )
    rows = [unique[key] for key in sorted(unique)]
    inserted = await session.execute(
        insert(IntuitEntityChange)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(K.realm_id, K.entity, K.entity_id, K.operation, K.occurred_second)
    )
    return {tuple(row) for row in inserted}


async def mark_processed(session: AsyncSession, outcomes: dict[int, dict[str, int]]) -> None:
    """Mark notifications processed, each with its outcomes, in one statement."""
    if not outcomes:
        return
    await session.execute(
        sa.text(
            "UPDATE intuit_notifications n SET processed_at = now(), outcomes = o.outcomes "
            "FROM jsonb_each(CAST(:outcomes AS jsonb)) AS o(id, outcomes) "
            "WHERE n.id = CAST(o.id AS bigint)"
        ),
        {"outcomes": json.dumps({str(k): v for k, v in outcomes.items()})},
    )


async def record_failure(session: AsyncSession, notification_id: int, error: str, *, set_aside: bool) -> None:
    """Count a failed attempt; a notification set aside is left out of later claims (it stays,
    with its error, for an operator)."""
    values: dict[str, Any] = {"attempts": N.attempts + 1, "last_error": error}
    if set_aside:
        values["processed_at"] = sa.func.now()
    await session.execute(sa.update(IntuitNotification).where(N.id == notification_id).values(**values))


async def prune(
    session: AsyncSession, *, changes_before: timedelta, notifications_before: timedelta, batch: int = 10_000
) -> int:
    """Forget change keys and processed notifications older than the given ages (a batch at a
    time, so no statement runs long); how many rows went."""
    changes = await session.execute(
        sa.text(
            "DELETE FROM intuit_entity_changes WHERE ctid IN (SELECT ctid FROM intuit_entity_changes "
            "WHERE occurred_second < now() - CAST(:age AS interval) LIMIT :batch)"
        ),
        {"age": changes_before, "batch": batch},
    )
    notifications = await session.execute(
        sa.text(
            "DELETE FROM intuit_notifications WHERE ctid IN (SELECT ctid FROM intuit_notifications "
            "WHERE processed_at < now() - CAST(:age AS interval) LIMIT :batch)"
        ),
        {"age": notifications_before, "batch": batch},
    )
    return int(changes.rowcount or 0) + int(notifications.rowcount or 0)  # type: ignore[attr-defined]
