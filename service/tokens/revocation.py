"""Revoking grants at Intuit through an outbox: a revocation is queued in the transaction that
decides it, and sent once that transaction has committed (or later, by the background worker),
so that nothing waits on Intuit with a row locked or a transaction open."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.crypto import DecryptionError, SecretBox
from service.core.db.engine import after_commit
from service.core.db.models import PendingRevocation
from service.core.metrics import BACKGROUND_ROW_ERRORS, BACKGROUND_RUNS
from service.domain import revocation_aad
from service.intuit.client import IntuitClient
from service.intuit.errors import IntuitError
from service.store import connections

log = logging.getLogger(__name__)

R = PendingRevocation.__table__.c  # type: ignore[attr-defined]
_MAX_BACKOFF = timedelta(hours=6)
# How long a claimed revocation is left to the replica that claimed it (Intuit's call is bounded
# by INTUIT_TIMEOUT_SECONDS × INTUIT_MAX_ATTEMPTS plus backoff, well under this).
_CLAIM_LEASE = timedelta(minutes=5)


def _aad(row: PendingRevocation) -> str:
    return revocation_aad(row.connection_id, row.id)


def queue_revocation(
    session: AsyncSession,
    box: SecretBox,
    *,
    connection_id: uuid.UUID,
    token: str,
    reason: str,
    error: str | None = None,
) -> uuid.UUID:
    """Queue a revocation in the caller's transaction (the outbox); returns its id."""
    row = PendingRevocation(
        id=uuid.uuid4(),
        connection_id=connection_id,
        token="",
        reason=reason,
        last_error=error,
        next_attempt_at=datetime.now(UTC) + timedelta(seconds=30),
    )
    row.token = box.encrypt(token, _aad(row))
    session.add(row)
    return row.id


def revoke_after_commit(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    intuit: IntuitClient,
    box: SecretBox,
    *,
    connection_id: uuid.UUID,
    token: str,
    reason: str,
) -> None:
    """Queue the revocation in the session's transaction, and send it once that has committed."""
    queued = queue_revocation(session, box, connection_id=connection_id, token=token, reason=reason)
    after_commit(session, lambda: revoke_queued(sessionmaker, intuit, box, [queued]))


async def revoke_queued(
    sessionmaker: async_sessionmaker[AsyncSession], intuit: IntuitClient, box: SecretBox, ids: list[uuid.UUID]
) -> None:
    """Revoke queued revocations now, after the transaction that queued them has committed.
    Nothing is locked while Intuit answers; one that fails stays queued for the background
    worker (revoking twice is harmless: Intuit answers a dead token with 400). A revocation
    whose queuing was rolled back is not found, and not sent."""
    for revocation_id in ids:
        async with sessionmaker() as session:
            row = await session.get(PendingRevocation, revocation_id)
        if row is None:
            continue
        try:
            await intuit.revoke(box.decrypt(row.token, _aad(row)))
        except DecryptionError:
            continue  # stays queued for a replica that holds the key
        except IntuitError as exc:
            log.warning(
                "revocation deferred: %s",
                type(exc).__name__,
                extra={"connection_id": str(row.connection_id), "intuit_tid": exc.intuit_tid},
            )
            continue
        async with sessionmaker() as session, session.begin():
            await _settle(session, row)
        BACKGROUND_RUNS.labels("revocation", "revoked").inc()


async def _settle(session: AsyncSession, row: PendingRevocation) -> None:
    """Drop a revocation Intuit confirmed, with a `revoked` event on its connection, if that
    still exists."""
    deleted = (
        await session.execute(sa.delete(PendingRevocation).where(R.id == row.id).returning(R.id))
    ).first()
    if deleted is None:
        return  # another replica settled it first
    await connections.add_event_if_exists(
        session, row.connection_id, "revoked", actor="broker", reason=row.reason
    )


def _back_off(row: PendingRevocation, error: str) -> None:
    row.attempts += 1
    row.last_error = error
    row.next_attempt_at = datetime.now(UTC) + min(
        timedelta(seconds=30 * 2 ** min(row.attempts, 10)), _MAX_BACKOFF
    )


async def retry_pending_revocations(
    sessionmaker: async_sessionmaker[AsyncSession], intuit: IntuitClient, box: SecretBox, *, batch: int = 20
) -> int:
    """One pass over due revocations. Replicas share the work: a short transaction claims due
    rows (SKIP LOCKED) by moving their next attempt past a lease, and commits; Intuit is then
    called with nothing locked, and each outcome is written in a transaction of its own. A
    replica killed meanwhile leaves its rows to be claimed again when the lease ends.

    Only revocations sealed under a key this process has are taken: the others stay queued for
    a replica that has it. One that does not open even so is never dropped: it stays queued,
    retried later, and the failure is logged and counted (qbo_broker_background_row_errors_total).
    """
    async with sessionmaker() as session, session.begin():
        rows = list(
            (
                await session.execute(
                    sa.select(PendingRevocation)
                    .where(
                        R.next_attempt_at <= sa.func.now(),
                        sa.func.split_part(R.token, ".", 1).in_(box.key_ids),
                    )
                    .order_by(R.next_attempt_at)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).scalars()
        )
        for row in rows:
            row.next_attempt_at = datetime.now(UTC) + _CLAIM_LEASE
    done = 0
    for row in rows:
        error = await _revoke_one(intuit, box, row)
        async with sessionmaker() as session, session.begin():
            if error is None:
                await _settle(session, row)
                done += 1
                BACKGROUND_RUNS.labels("revocation", "revoked").inc()
            else:
                claimed = await session.get(PendingRevocation, row.id)
                if claimed is not None:
                    _back_off(claimed, error)
    return done


async def _revoke_one(intuit: IntuitClient, box: SecretBox, row: PendingRevocation) -> str | None:
    """Revoke one queued token; None when Intuit confirmed, else what went wrong."""
    try:
        token = box.decrypt(row.token, _aad(row))
    except DecryptionError as exc:
        log.error(
            "pending revocation %s does not open (%s); kept queued",
            row.id,
            exc,
            extra={"connection_id": str(row.connection_id)},
        )
        BACKGROUND_ROW_ERRORS.labels("revocation", "undecryptable").inc()
        return "DecryptionError"
    try:
        await intuit.revoke(token)
    except IntuitError as exc:
        BACKGROUND_RUNS.labels("revocation", "deferred").inc()
        return type(exc).__name__
    except Exception as exc:  # one row's surprise is not the others' problem
        log.error(
            "pending revocation %s failed: %s; kept queued",
            row.id,
            type(exc).__name__,
            extra={"connection_id": str(row.connection_id)},
        )
        BACKGROUND_ROW_ERRORS.labels("revocation", "error").inc()
        return type(exc).__name__
    return None
