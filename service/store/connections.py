"""Every statement on the `connections` table, and on the tables that hang off a connection:
pending links, QuickBooks user claims, the audit trail (connection_events) and the refresher's
refresh_attempts.

Two ways in, one per kind of caller:
- Functions on an AsyncSession (SQLAlchemy), for the transactions of the API, the Connect flow,
  the revocation outbox, Intuit's notifications and the background worker; they return the
  models of service.core.db.models (changed through the ORM by their callers), ids or counts.
- Plain SQL on the asyncpg pool, for the hot paths (GET /status, the token endpoint and the
  refresher): one statement, one round trip each, returning typed rows (`StatusRow`,
  `ConnectionRow`, `DecisionRow`) built straight from asyncpg's records.

Statuses come from service.domain.Status: bound as parameters, or (where the planner must see a
literal to use a partial index) formatted into the statement once, at import.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.db.locking import TENANT_LOCK_NAMESPACE
from service.core.db.models import Connection, ConnectionEvent, PendingLink, QuickBooksUserClaim
from service.core.pagination import id_cursor, page, time_id_cursor, time_id_of
from service.domain import LIVE_STATUSES, Status
from service.events import outbox

C = Connection.__table__.c  # type: ignore[attr-defined]
P = PendingLink.__table__.c  # type: ignore[attr-defined]
E = ConnectionEvent.__table__.c  # type: ignore[attr-defined]


def _literal(status: Status) -> str:
    return f"'{status.value}'"


# Literals, not parameters, where a generic plan could not use the partial indexes on connected rows.
_CONNECTED = _literal(Status.CONNECTED)
_LIVE = ", ".join(_literal(s) for s in LIVE_STATUSES)


# --- Typed rows of the plain-SQL reads. Each statement selects exactly the row's fields, in
# order (its column list is made from `_fields`), so a row is `Row._make(record)`.


class StatusRow(NamedTuple):
    """A connection as the link icon (GET /status) shows it."""

    id: uuid.UUID
    status: str
    realm_id: str | None
    company_name: str | None
    owner_user_id: str | None
    owner_qb_sub: str | None
    owner_qb_email: str | None
    owner_qb_name: str | None
    module_ar: bool
    module_ap: bool
    access_token_expires_at: datetime | None


class ConnectionRow(NamedTuple):
    """A connection as the token endpoint and the refresher need it (tokens still sealed)."""

    id: uuid.UUID
    tenant_id: str
    status: str
    realm_id: str | None
    access_token: str | None
    refresh_token: str | None
    access_token_expires_at: datetime | None
    refresh_token_issued_at: datetime | None
    keepalive_due_at: datetime | None
    last_refreshed_at: datetime | None


class DecisionRow(NamedTuple):
    """A ConnectionRow read under the row lock, with the refresher's decision: whether an attempt
    left behind names the stored refresh token (`unresolved`), and the id of the attempt
    recorded now if a refresh is due (`attempt`, else None)."""

    id: uuid.UUID
    tenant_id: str
    status: str
    realm_id: str | None
    access_token: str | None
    refresh_token: str | None
    access_token_expires_at: datetime | None
    refresh_token_issued_at: datetime | None
    keepalive_due_at: datetime | None
    last_refreshed_at: datetime | None
    unresolved: bool
    attempt: int | None


assert DecisionRow._fields == (*ConnectionRow._fields, "unresolved", "attempt")


def _columns(fields: Sequence[str], table: str = "") -> str:
    return ", ".join(f"{table}{name}" for name in fields)


# --- Sessions (ORM).


async def lock_tenant(session: AsyncSession, tenant_id: str) -> None:
    """Serialize this transaction with others that lock the tenant, until it ends."""
    await session.execute(
        sa.select(
            sa.func.pg_advisory_xact_lock(
                sa.literal(TENANT_LOCK_NAMESPACE, sa.Integer), sa.func.hashtext(tenant_id)
            )
        )
    )


async def count_tenant_connections(session: AsyncSession, tenant_id: str) -> int:
    stmt = sa.select(sa.func.count()).select_from(Connection).where(C.tenant_id == tenant_id)
    return int((await session.execute(stmt)).scalar_one())


async def create_connection(session: AsyncSession, *, tenant_id: str) -> Connection:
    conn = Connection(tenant_id=tenant_id)
    session.add(conn)
    await session.flush()
    return conn


async def get_connection(
    session: AsyncSession, connection_id: uuid.UUID, *, for_update: bool = False
) -> Connection | None:
    stmt = sa.select(Connection).where(C.id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_pending_link(
    session: AsyncSession, connection_id: uuid.UUID, *, for_update: bool = False
) -> PendingLink | None:
    stmt = sa.select(PendingLink).where(P.connection_id == connection_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_connections(
    session: AsyncSession, *, tenant_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[tuple[Connection, PendingLink | None]], str | None]:
    stmt = (
        sa.select(Connection, PendingLink)
        .outerjoin(PendingLink, P.connection_id == C.id)
        .where(C.tenant_id == tenant_id)
        .order_by(C.created_at.desc(), C.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        stmt = stmt.where(C.status == status)
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(C.created_at, C.id) < sa.tuple_(*time_id_cursor(cursor)))
    rows: list[tuple[Connection, PendingLink | None]] = [
        (row[0], row[1]) for row in (await session.execute(stmt)).all()
    ]
    return page(rows, limit, lambda row: time_id_of(row[0]))


async def realm_linked_elsewhere(session: AsyncSession, *, realm_id: str, connection_id: uuid.UUID) -> bool:
    stmt = sa.select(
        sa.exists().where(C.realm_id == realm_id, C.id != connection_id, C.status.in_(LIVE_STATUSES))
    )
    return bool((await session.execute(stmt)).scalar_one())


async def live_connections(session: AsyncSession, realms: Sequence[str]) -> dict[str, tuple[uuid.UUID, str]]:
    """realm id → (connection id, tenant id) of the live connection that holds it (live as in
    uq_connections_live_realm, so at most one per realm)."""
    if not realms:
        return {}
    rows = await session.execute(
        sa.text(
            "SELECT realm_id, id, tenant_id FROM connections "  # noqa: S608 (this module's literals)
            f"WHERE realm_id = ANY(:realms) AND status IN ({_LIVE})"
        ),
        {"realms": list(realms)},
    )
    return {row.realm_id: (row.id, row.tenant_id) for row in rows}


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(sa.select(C.status, sa.func.count()).group_by(C.status))
    return {status: count for status, count in rows.all()}


async def claimed_by(session: AsyncSession, *, tenant_id: str, qb_sub: str) -> str | None:
    stmt = sa.select(QuickBooksUserClaim.user_id).where(  # type: ignore[call-overload]
        QuickBooksUserClaim.tenant_id == tenant_id, QuickBooksUserClaim.qb_sub == qb_sub
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def claim_quickbooks_user(session: AsyncSession, *, tenant_id: str, qb_sub: str, user_id: str) -> None:
    await session.execute(
        pg_insert(QuickBooksUserClaim)
        .values(tenant_id=tenant_id, qb_sub=qb_sub, user_id=user_id)
        .on_conflict_do_nothing()
    )


async def add_event(
    session: AsyncSession, conn: Connection, type_: str, *, actor: str | None, **details: Any
) -> None:
    """Record a change in the connection's audit trail and, for the public kinds, publish its
    event (service.events.outbox), both in the change's transaction."""
    kept = {k: v for k, v in details.items() if v is not None}
    session.add(
        ConnectionEvent(
            connection_id=conn.id, tenant_id=conn.tenant_id, type=type_, actor=actor, details=kept
        )
    )
    public = outbox.public_event(type_, conn, kept)
    if public is not None:
        await outbox.emit(session, public[0], tenant_id=conn.tenant_id, connection_id=conn.id, data=public[1])


async def add_event_if_exists(
    session: AsyncSession, connection_id: uuid.UUID, type_: str, *, actor: str, **details: Any
) -> None:
    """Record an event in a connection's audit trail if the connection still exists (one
    statement; nothing is read first). Only for the broker's own kinds, which publish nothing."""
    await session.execute(
        sa.insert(ConnectionEvent).from_select(
            [E.connection_id, E.tenant_id, E.type, E.actor, E.details],
            sa.select(
                C.id,
                C.tenant_id,
                sa.literal(type_),
                sa.literal(actor),
                sa.func.jsonb_build_object(*(x for pair in details.items() for x in pair)),
            ).where(C.id == connection_id),
        )
    )


async def list_events(
    session: AsyncSession, *, connection_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[ConnectionEvent], str | None]:
    stmt = (
        sa.select(ConnectionEvent)
        # A replica still on the code before migration 0009 (a rolling deploy) writes its
        # refresh attempts here: they are its bookkeeping, not history.
        .where(E.connection_id == connection_id, E.type != "refresh_attempt")
        .order_by(E.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        stmt = stmt.where(E.id < id_cursor(cursor))
    events = list((await session.execute(stmt)).scalars())
    return page(events, limit, lambda event: (str(event.id),))


# --- The background worker's selections.


def due_connections_query(
    *, now: datetime, access_by: datetime | None, limit: int, key_ids: Sequence[str] | None = None
) -> sa.Select:  # type: ignore[type-arg]
    """Ids of connections whose refresh token is old or near its end (or, with access_by, whose
    access token expires by then). Each branch is served by a partial index on connected rows.
    With key_ids, only connections whose tokens are sealed under one of them."""
    connected = sa.text(f"status = {_CONNECTED}")  # a literal: see _CONNECTED
    readable = sa.func.split_part(C.refresh_token, ".", 1).in_(key_ids) if key_ids is not None else sa.true()
    keepalive = (
        sa.select(C.id)
        .where(connected, C.keepalive_due_at <= now, readable)
        .order_by(C.keepalive_due_at)
        .limit(limit)
    )
    if access_by is None:
        return keepalive
    access = (
        sa.select(C.id)
        .where(connected, C.access_token_expires_at <= access_by, readable)
        .order_by(C.access_token_expires_at)
        .limit(limit)
    )
    return sa.union(keepalive, access).limit(limit)  # type: ignore[return-value]


async def due_connections(
    session: AsyncSession, *, now: datetime, access_by: datetime | None, limit: int, key_ids: Sequence[str]
) -> list[uuid.UUID]:
    stmt = due_connections_query(now=now, access_by=access_by, limit=limit, key_ids=key_ids)
    return list((await session.execute(stmt)).scalars())


async def expired_pending_links(
    session: AsyncSession, *, key_ids: Sequence[str], after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[PendingLink]:
    """Pending links past their expiry and sealed under key_ids, in expiry order after `after`,
    locked (skipping those locked by others) until the transaction ends."""
    readable = sa.and_(
        sa.func.split_part(P.access_token, ".", 1).in_(key_ids),
        sa.func.split_part(P.refresh_token, ".", 1).in_(key_ids),
    )
    stmt = (
        sa.select(PendingLink)
        .where(P.expires_at <= sa.func.now(), readable)
        .order_by(P.expires_at, P.connection_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if after is not None:
        stmt = stmt.where(sa.tuple_(P.expires_at, P.connection_id) > sa.tuple_(*after))
    return list((await session.execute(stmt)).scalars())


# Due work sealed under key ids this process is not configured with, by task and key id.
_UNKNOWN_KEYS = sa.text(f"""
SELECT 'keepalive' AS task, split_part(refresh_token, '.', 1) AS kid, count(*) AS n
FROM connections
WHERE status = {_CONNECTED} AND keepalive_due_at <= now()
  AND split_part(refresh_token, '.', 1) <> ALL(:kids)
GROUP BY 2
UNION ALL
SELECT 'pending_link', kid, count(*) FROM (
  SELECT CASE WHEN split_part(access_token, '.', 1) <> ALL(:kids)
              THEN split_part(access_token, '.', 1) ELSE split_part(refresh_token, '.', 1) END
  FROM pending_links
  WHERE expires_at <= now() AND (split_part(access_token, '.', 1) <> ALL(:kids)
                                 OR split_part(refresh_token, '.', 1) <> ALL(:kids))) p(kid)
GROUP BY 2
UNION ALL
SELECT 'revocation', split_part(token, '.', 1), count(*) FROM pending_revocations
WHERE next_attempt_at <= now() AND split_part(token, '.', 1) <> ALL(:kids)
GROUP BY 2
""")  # noqa: S608 (this module's literals)


async def due_under_unknown_keys(session: AsyncSession, key_ids: Sequence[str]) -> list[tuple[str, str, int]]:
    """(task, key id, count) of due rows sealed under a key id not in key_ids."""
    rows = await session.execute(_UNKNOWN_KEYS, {"kids": list(key_ids)})
    return [(task, kid, count) for task, kid, count in rows.all()]


# --- The link icon: GET /status's read, on cache misses only. Straight to asyncpg, one
# statement in autocommit: no session, no transaction, no ORM.

_STATUS_SQL = f"""
SELECT {_columns(StatusRow._fields)}
FROM connections WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2
"""  # noqa: S608 (this module's literals)


async def read_tenant_status(pool: asyncpg.Pool, tenant_id: str, *, limit: int) -> list[StatusRow]:
    """The link-status columns of a tenant's newest `limit` connections."""
    return [StatusRow._make(row) for row in await pool.fetch(_STATUS_SQL, tenant_id, limit)]


# --- The token endpoint and the refresher (service.tokens.refresh): plain SQL on the asyncpg
# pool, few round trips, and every write one statement (atomic on its own), conditional on the
# row still holding the token that was sent.

_READ = f"""
SELECT {_columns(ConnectionRow._fields)}
FROM connections WHERE id = ANY($1::uuid[])"""  # noqa: S608 (this module's literals)


async def read_rows(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[ConnectionRow]:
    """The rows of the connections among `ids` that exist, in one statement."""
    return [ConnectionRow._make(row) for row in await pool.fetch(_READ, ids)]


def _due(valid_until: str, refreshed_after: str, keepalive_by: str) -> str:
    """service.tokens.refresh's _Due in SQL over a row `c`, its thresholds given as SQL
    expressions."""
    return f"""(
  ({valid_until} IS NOT NULL AND (c.access_token IS NULL OR c.access_token_expires_at IS NULL
                                  OR c.access_token_expires_at < {valid_until}))
  OR ({refreshed_after} IS NOT NULL AND (c.last_refreshed_at IS NULL
                                         OR c.last_refreshed_at < {refreshed_after}))
  OR ({keepalive_by} IS NOT NULL AND c.keepalive_due_at <= {keepalive_by}))"""


def _decide_statement(lock: str) -> str:
    """One statement under the row locks of several connections, each with its own rule and
    actor ($1 ids, $2 valid_until, $3 refreshed_after, $4 keepalive_by, $5 actors): for each
    connection, the row; whether a refresh attempt left behind names its stored refresh token
    (`unresolved`: the token may be dead already); and, if the connection is usable and a
    refresh is due (_due), a new refresh_attempts row naming that token by its issue time,
    whose id is `attempt` (else NULL). Rows are locked in id order. Atomic like the transaction
    it replaces, in one round trip for all of them."""
    return f"""
WITH asked AS (
  SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[],
                       $5::text[]) AS a(id, valid_until, refreshed_after, keepalive_by, actor)),
c AS (
  SELECT {_columns(ConnectionRow._fields, "c.")},
         a.valid_until, a.refreshed_after, a.keepalive_by, a.actor,
         EXISTS (SELECT 1 FROM refresh_attempts r
                 WHERE r.connection_id = c.id
                   AND r.refresh_token_issued_at IS NOT DISTINCT FROM c.refresh_token_issued_at)
           AS unresolved
  FROM connections c JOIN asked a ON a.id = c.id ORDER BY c.id {lock}),
attempt AS (
  INSERT INTO refresh_attempts (connection_id, refresh_token_issued_at, actor)
  SELECT c.id, c.refresh_token_issued_at, c.actor
  FROM c WHERE c.status = {_CONNECTED} AND c.refresh_token IS NOT NULL
    AND {_due("c.valid_until", "c.refreshed_after", "c.keepalive_by")}
  RETURNING id, connection_id)
SELECT {_columns(ConnectionRow._fields, "c.")}, c.unresolved, t.id AS attempt
FROM c LEFT JOIN attempt t ON t.connection_id = c.id"""  # noqa: S608 (this module's literals)


_DECIDE = _decide_statement("FOR NO KEY UPDATE OF c")
_DECIDE_OR_SKIP = _decide_statement("FOR NO KEY UPDATE OF c SKIP LOCKED")


async def decide(
    pool: asyncpg.Pool,
    ids: list[uuid.UUID],
    valid_until: list[datetime | None],
    refreshed_after: list[datetime | None],
    keepalive_by: list[datetime | None],
    actors: list[str],
    *,
    skip_locked: bool = False,
) -> list[DecisionRow]:
    """The decisions for several connections at once (_decide_statement), one row for each
    that exists (and, with skip_locked, is not locked by another transaction)."""
    statement = _DECIDE_OR_SKIP if skip_locked else _DECIDE
    rows = await pool.fetch(statement, ids, valid_until, refreshed_after, keepalive_by, actors)
    return [DecisionRow._make(row) for row in rows]


def _holds_sent(sent: str) -> str:
    """Whether the connection's row `c` still holds the refresh token a refresh started from
    (the one issued at `sent`, an SQL expression): the condition on storing its outcome."""
    return f"""c.status = {_CONNECTED} AND c.refresh_token IS NOT NULL
    AND c.refresh_token_issued_at IS NOT DISTINCT FROM {sent}"""


def _outcome_statement(assignments: str, event: str, public_event: str | None = None) -> str:
    """One statement that stores a refresh's outcome: it changes the row (`assignments`, from
    $5 on) only if the row still holds the refresh token the refresh started from ($1 id, $2 its
    refresh_token_issued_at), then drops the connection's refresh_attempts rows (the token's
    fate is known), logs `event` ($3 actor, $4 details) and, if given, publishes `public_event`
    with the connection's new state (service.events.outbox). It returns the tenant id if it
    applied."""
    published = (
        ""
        if public_event is None
        else f""",
published AS (INSERT INTO events (id, type, tenant_id, connection_id, data)
              SELECT gen_random_uuid(), '{public_event}', c.tenant_id, c.id,
                     {outbox.CONNECTION_STATE_SQL} FROM changed c)"""  # noqa: S608
    )
    return f"""
WITH changed AS (
  UPDATE connections c SET {assignments}
  WHERE c.id = $1 AND {_holds_sent("$2")}
  RETURNING *),
settled AS (DELETE FROM refresh_attempts WHERE connection_id = $1 AND EXISTS (SELECT 1 FROM changed)),
logged AS (INSERT INTO connection_events (connection_id, tenant_id, type, actor, details)
           SELECT id, tenant_id, '{event}', $3, $4::jsonb FROM changed){published}
SELECT tenant_id FROM changed"""  # noqa: S608 (built from this module's literals only)


class StoredRow(NamedTuple):
    """One refresh outcome given to store_tokens: the tenant if the new tokens were stored, else
    None; `busy` (only when asked not to wait for locks): not stored, and the row may still hold
    the token (another transaction held it, or changed it while the statement ran): store it
    again, waiting."""

    id: uuid.UUID
    tenant_id: str | None
    busy: bool


def _store_tokens_statement(*, skip_locked: bool) -> str:
    """The new tokens of several refreshes in one statement (store_tokens). Rows are locked in
    id order first, as the decisions lock them. A row another transaction holds is waited for,
    or with skip_locked passed over (and reported busy), so that one row a writer holds does
    not hold up the outcomes of other connections."""
    lock = "FOR NO KEY UPDATE OF c" + (" SKIP LOCKED" if skip_locked else "")
    # Passed over: not stored, and held the token as of the statement's start.
    busy = (
        f"""ch.id IS NULL AND NOT EXISTS (SELECT 1 FROM locked l WHERE l.id = a.id)
         AND EXISTS (SELECT 1 FROM connections c WHERE c.id = a.id AND {_holds_sent("a.sent")})"""  # noqa: S608
        if skip_locked
        else "false"
    )
    return f"""
WITH asked AS (
  SELECT DISTINCT ON (id) * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                                        $5::text[], $6::timestamptz[], $7::timestamptz[],
                                        $8::timestamptz[], $9::timestamptz[]) WITH ORDINALITY
    AS a(id, sent, actor, access_token, refresh_token, access_token_expires_at,
         refresh_token_expires_at, now, keepalive_due_at, n)
  ORDER BY id, n),
locked AS MATERIALIZED (
  SELECT c.id FROM connections c JOIN asked a ON a.id = c.id WHERE {_holds_sent("a.sent")}
  ORDER BY c.id {lock}),
changed AS (
  UPDATE connections c
  SET access_token = a.access_token, refresh_token = a.refresh_token,
      access_token_expires_at = a.access_token_expires_at,
      refresh_token_expires_at = a.refresh_token_expires_at, refresh_token_issued_at = a.now,
      last_refreshed_at = a.now, keepalive_due_at = a.keepalive_due_at, updated_at = a.now
  FROM asked a JOIN locked l ON l.id = a.id
  WHERE c.id = a.id AND {_holds_sent("a.sent")}
  RETURNING c.id, c.tenant_id, a.actor),
settled AS (DELETE FROM refresh_attempts r USING changed WHERE r.connection_id = changed.id),
logged AS (INSERT INTO connection_events (connection_id, tenant_id, type, actor, details)
           SELECT id, tenant_id, 'refreshed', actor, '{{}}'::jsonb FROM changed)
SELECT a.id, ch.tenant_id, {busy} AS busy
FROM asked a LEFT JOIN changed ch ON ch.id = a.id"""  # noqa: S608 (this module's literals)


_MARK_REFUSED = _outcome_statement(
    f"status = {_literal(Status.REAUTHORIZATION_REQUIRED)}, last_error_code = $5, "
    "last_error_message = $6, last_error_at = $7, updated_at = $7",
    "refresh_failed",
    outbox.CONNECTION_REAUTHORIZATION_REQUIRED,
)
_SETTLE_ONE = "DELETE FROM refresh_attempts WHERE id = $1"
_STORE_TOKENS = _store_tokens_statement(skip_locked=False)
_STORE_TOKENS_OR_SKIP = _store_tokens_statement(skip_locked=True)


async def store_tokens(
    pool: asyncpg.Pool,
    ids: list[uuid.UUID],
    sent: list[datetime | None],
    actors: list[str],
    access_tokens: list[str],
    refresh_tokens: list[str],
    access_token_expires_at: list[datetime],
    refresh_token_expires_at: list[datetime],
    now: list[datetime],
    keepalive_due_at: list[datetime],
    *,
    skip_locked: bool = False,
) -> list[StoredRow]:
    """Several refreshes' new tokens (sealed, as service.tokens.credentials.sealed_tokens makes
    them), in one statement: each connection's only if its row still holds the refresh token
    issued at its `sent`. For each that was stored, its attempts are dropped and a `refreshed`
    event is logged. One row per connection asked about (the same connection twice: the first
    is stored, at most, and both get its row). With skip_locked, a row another transaction
    holds is left as it is and reported busy, instead of waited for."""
    rows = await pool.fetch(
        _STORE_TOKENS_OR_SKIP if skip_locked else _STORE_TOKENS,
        ids,
        sent,
        actors,
        access_tokens,
        refresh_tokens,
        access_token_expires_at,
        refresh_token_expires_at,
        now,
        keepalive_due_at,
    )
    return [StoredRow._make(row) for row in rows]


async def mark_refused(
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    sent: datetime | None,
    *,
    actor: str,
    details: str,
    code: str,
    message: str,
    now: datetime,
) -> str | None:
    """Intuit refused the refresh token issued at `sent`: the connection needs a new Connect, if
    the row still holds that token; the tenant id if it did."""
    tenant: str | None = await pool.fetchval(
        _MARK_REFUSED, connection_id, sent, actor, details, code, message, now
    )
    return tenant


async def settle_attempt(pool: asyncpg.Pool, attempt: int) -> None:
    """Drop one refresh attempt: its refresh token never reached Intuit, or its fate is moot."""
    await pool.execute(_SETTLE_ONE, attempt)
