"""The webhook sender's SQL: claiming deliveries, recording outcomes, disabling endpoints."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

# The first key of the transaction-level advisory lock that serializes claims of deliveries, so
# the per-endpoint bound holds across replicas ("QBOW").
CLAIM_LOCK_NAMESPACE = 0x5142_4F57
# Announces deliveries made other than by an event's fan-out (redeliveries).
DELIVERIES_CHANNEL = "qbo_webhook_deliveries"


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


async def claim(
    pool: asyncpg.Pool, *, now: datetime | None, per_endpoint: int, limit: int, lease: timedelta
) -> tuple[uuid.UUID, list[asyncpg.Record]]:
    """Lease due deliveries for sending (one short transaction); the lease token and the rows.
    Claims take turns on an advisory lock, so two replicas never count the same free places."""
    token = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        # The database's clock unless one is given (tests), so new deliveries (stamped by the
        # database) are due at once whatever this host's clock says.
        at = await conn.fetchval(
            "SELECT coalesce($2::timestamptz, clock_timestamp()) FROM pg_advisory_xact_lock($1, 0)",
            CLAIM_LOCK_NAMESPACE,
            now,
        )
        rows = await conn.fetch(_CLAIM, at, token, per_endpoint, limit, lease)
    return token, rows


async def record_outcomes(pool: asyncpg.Pool, outcomes: Sequence[Outcome], *, now: datetime) -> None:
    await pool.execute(
        _RECORD,
        [o.delivery_id for o in outcomes],
        [o.token for o in outcomes],
        [o.succeeded for o in outcomes],
        [o.status_code for o in outcomes],
        [o.duration_ms for o in outcomes],
        [o.error for o in outcomes],
        [o.retry_at for o in outcomes],
        now,
    )


async def disable_endpoint(pool: asyncpg.Pool, endpoint_id: uuid.UUID, *, now: datetime, reason: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_DISABLE, endpoint_id, now, reason)


async def next_due(pool: asyncpg.Pool) -> datetime | None:
    value: Any = await pool.fetchval(_NEXT_DUE)
    return value  # type: ignore[no-any-return]
