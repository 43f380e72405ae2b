"""All SQL about webhook endpoints and deliveries (events themselves: service.events.outbox)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.connections.repository import decode_cursor, encode_cursor
from service.core.errors import ValidationFailed
from service.events.models import Event, WebhookDelivery, WebhookEndpoint

W = WebhookEndpoint.__table__.c  # type: ignore[attr-defined]
D = WebhookDelivery.__table__.c  # type: ignore[attr-defined]
EV = Event.__table__.c  # type: ignore[attr-defined]

# The first key of the transaction-level advisory lock that serializes claims of deliveries, so
# the per-endpoint bound holds across replicas ("QBOW").
CLAIM_LOCK_NAMESPACE = 0x5142_4F57
# Announces deliveries made other than by an event's fan-out (redeliveries).
DELIVERIES_CHANNEL = "qbo_webhook_deliveries"


def bad_cursor() -> ValidationFailed:
    return ValidationFailed("The cursor is not valid.", errors=[
        {"loc": ["query", "cursor"], "msg": "not a cursor from this API", "type": "value_error"}])


def _time_id_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    stamp, ident = decode_cursor(cursor, 2)
    try:
        after = (datetime.fromisoformat(stamp), uuid.UUID(ident))
    except ValueError:
        raise bad_cursor() from None
    if (after[0].utcoffset() != timedelta(0) or after[0].isoformat() != stamp
            or str(after[1]) != ident):
        raise bad_cursor()
    return after


async def count_endpoints(session: AsyncSession, *, tenant_id: str | None) -> int:
    stmt = sa.select(sa.func.count()).select_from(WebhookEndpoint).where(
        W.tenant_id.is_(None) if tenant_id is None else W.tenant_id == tenant_id)
    return int((await session.execute(stmt)).scalar_one())


async def get_endpoint(session: AsyncSession, endpoint_id: uuid.UUID, *,
                       for_update: bool = False) -> WebhookEndpoint | None:
    stmt = sa.select(WebhookEndpoint).where(W.id == endpoint_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_endpoints(session: AsyncSession, *, tenant_id: str | None, limit: int,
                         cursor: str | None) -> tuple[list[WebhookEndpoint], str | None]:
    stmt = (sa.select(WebhookEndpoint).order_by(W.created_at.desc(), W.id.desc())
            .limit(limit + 1))
    if tenant_id is not None:
        stmt = stmt.where(W.tenant_id == tenant_id)
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(W.created_at, W.id) < sa.tuple_(*_time_id_cursor(cursor)))
    rows = list((await session.execute(stmt)).scalars())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at.isoformat(), str(rows[-1].id))
    return rows, next_cursor


async def list_deliveries(session: AsyncSession, *, endpoint_id: uuid.UUID, limit: int,
                          cursor: str | None) -> tuple[list[tuple[WebhookDelivery, str]], str | None]:
    stmt = (sa.select(WebhookDelivery, EV.type).join(Event, EV.id == D.event_id)
            .where(D.endpoint_id == endpoint_id)
            .order_by(D.created_at.desc(), D.id.desc()).limit(limit + 1))
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(D.created_at, D.id) < sa.tuple_(*_time_id_cursor(cursor)))
    rows: list[tuple[WebhookDelivery, str]] = [
        (row[0], row[1]) for row in (await session.execute(stmt)).all()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1][0]
        next_cursor = encode_cursor(last.created_at.isoformat(), str(last.id))
    return rows, next_cursor


async def cancel_pending(session: AsyncSession, endpoint_id: uuid.UUID) -> None:
    await session.execute(sa.update(WebhookDelivery)
                          .where(D.endpoint_id == endpoint_id, D.status == "pending")
                          .values(status="cancelled", next_attempt_at=None))


async def event_exists(session: AsyncSession, event_id: uuid.UUID) -> bool:
    stmt = sa.select(sa.exists().where(EV.id == event_id))
    return bool((await session.execute(stmt)).scalar_one())


async def add_redeliveries(session: AsyncSession, *, event_id: uuid.UUID,
                           endpoint_id: uuid.UUID | None) -> list[tuple[WebhookDelivery, str]]:
    """A new delivery of the event, due now, for each enabled endpoint it is for (or just the
    named one); announced on the events channel so a sender starts at once."""
    matches = (sa.select(sa.func.gen_random_uuid(), W.id, EV.id, sa.func.now())
               .select_from(WebhookEndpoint).join(Event, EV.id == event_id)
               .where(W.disabled_at.is_(None),
                      sa.or_(W.tenant_id.is_(None), W.tenant_id == EV.tenant_id),
                      sa.or_(W.event_types.is_(None), EV.type == sa.func.any(W.event_types))))
    if endpoint_id is not None:
        matches = matches.where(W.id == endpoint_id)
    inserted = await session.execute(
        sa.insert(WebhookDelivery)
        .from_select(["id", "endpoint_id", "event_id", "next_attempt_at"], matches)
        .returning(D.id))
    ids = list(inserted.scalars())
    if ids:
        await session.execute(sa.select(sa.func.pg_notify(DELIVERIES_CHANNEL, "")))
    stmt = (sa.select(WebhookDelivery, EV.type).join(Event, EV.id == D.event_id)
            .where(D.id.in_(ids)).order_by(D.id))
    return [(row[0], row[1]) for row in (await session.execute(stmt)).all()]


# The sender's statements: plain SQL on an asyncpg pool, each transaction short and free of
# any call to a receiver.

# Due deliveries of enabled endpoints, at most $3 per endpoint in flight anywhere (leases not
# yet run out count), $4 in all: leased for $5 under a fresh token ($2), one attempt counted.
_CLAIM = """
WITH busy AS (
  SELECT endpoint_id, count(*) AS n FROM webhook_deliveries
  WHERE status = 'pending' AND lease_expires_at > $1 GROUP BY endpoint_id),
due AS (
  SELECT d.id, d.endpoint_id, d.next_attempt_at
  FROM webhook_endpoints e CROSS JOIN LATERAL (
    SELECT id, endpoint_id, next_attempt_at FROM webhook_deliveries
    WHERE endpoint_id = e.id AND status = 'pending' AND next_attempt_at <= $1
      AND (lease_expires_at IS NULL OR lease_expires_at <= $1)
    ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) d
  WHERE e.disabled_at IS NULL),
ranked AS (
  SELECT due.id, due.next_attempt_at,
         row_number() OVER (PARTITION BY due.endpoint_id ORDER BY due.next_attempt_at, due.id)
           + coalesce(busy.n, 0) AS place
  FROM due LEFT JOIN busy USING (endpoint_id)),
chosen AS (
  SELECT id FROM ranked WHERE place <= $3 ORDER BY next_attempt_at, id LIMIT $4)
UPDATE webhook_deliveries d
SET lease_token = $2, lease_expires_at = $1 + $5::interval, attempts = d.attempts + 1,
    last_attempt_at = $1
FROM chosen, webhook_endpoints e, events ev
WHERE d.id = chosen.id AND e.id = d.endpoint_id AND ev.id = d.event_id
RETURNING d.id, d.attempts, d.endpoint_id, e.url, e.secret, e.previous_secret,
          e.previous_secret_expires_at, ev.id AS event_id, ev.type, ev.occurred_at,
          ev.tenant_id, ev.connection_id, ev.data::text AS data
"""

# Outcomes of attempts, each applied only while its lease holds: succeeded, to be retried at
# retry_at, or failed (no retry_at).
_RECORD = """
UPDATE webhook_deliveries d SET
  status = CASE WHEN o.succeeded THEN 'succeeded'
                WHEN o.retry_at IS NULL THEN 'failed' ELSE 'pending' END,
  delivered_at = CASE WHEN o.succeeded THEN $8::timestamptz END,
  next_attempt_at = CASE WHEN o.succeeded THEN NULL ELSE o.retry_at END,
  lease_token = NULL, lease_expires_at = NULL,
  last_status_code = o.status_code, last_duration_ms = o.duration_ms, last_error = o.error
FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::int[], $5::int[], $6::text[],
            $7::timestamptz[]) AS o(id, token, succeeded, status_code, duration_ms, error,
                                    retry_at)
WHERE d.id = o.id AND d.lease_token = o.token AND d.status = 'pending'
"""

_DISABLE = """
WITH endpoint AS (
  UPDATE webhook_endpoints SET disabled_at = $2, disabled_reason = $3, updated_at = $2
  WHERE id = $1 AND disabled_at IS NULL RETURNING id)
UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL
WHERE endpoint_id = $1 AND status = 'pending' AND EXISTS (SELECT 1 FROM endpoint)
"""

_NEXT_DUE = """
SELECT min(d.next_attempt_at) FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id
WHERE d.status = 'pending' AND e.disabled_at IS NULL
  AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= clock_timestamp())
"""


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    delivery_id: uuid.UUID
    token: uuid.UUID  # the lease it was sent under
    endpoint_id: uuid.UUID
    succeeded: bool
    status_code: int | None
    duration_ms: int
    error: str | None = None
    retry_at: datetime | None = None  # None for a failure: no more attempts


async def claim(pool: asyncpg.Pool, *, now: datetime | None, per_endpoint: int, limit: int,
                lease: timedelta) -> tuple[uuid.UUID, list[asyncpg.Record]]:
    """Lease due deliveries for sending (one short transaction); the lease token and the rows.
    Claims take turns on an advisory lock, so two replicas never count the same free places."""
    token = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        # The database's clock unless one is given (tests), so new deliveries (stamped by the
        # database) are due at once whatever this host's clock says.
        at = await conn.fetchval("SELECT coalesce($2::timestamptz, clock_timestamp()) "
                                 "FROM pg_advisory_xact_lock($1, 0)", CLAIM_LOCK_NAMESPACE, now)
        rows = await conn.fetch(_CLAIM, at, token, per_endpoint, limit, lease)
    return token, rows


async def record_outcomes(pool: asyncpg.Pool, outcomes: Sequence[Outcome], *,
                          now: datetime) -> None:
    await pool.execute(_RECORD, [o.delivery_id for o in outcomes], [o.token for o in outcomes],
                       [o.succeeded for o in outcomes], [o.status_code for o in outcomes],
                       [o.duration_ms for o in outcomes], [o.error for o in outcomes],
                       [o.retry_at for o in outcomes], now)


async def disable_endpoint(pool: asyncpg.Pool, endpoint_id: uuid.UUID, *, now: datetime,
                           reason: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_DISABLE, endpoint_id, now, reason)


async def next_due(pool: asyncpg.Pool) -> datetime | None:
    value: Any = await pool.fetchval(_NEXT_DUE)
    return value  # type: ignore[no-any-return]
