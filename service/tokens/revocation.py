"""Revoking grants at Intuit, and remembering the ones Intuit could not be told about yet."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import PendingRevocation
from service.intuit.client import IntuitClient
from service.intuit.errors import IntuitError
from service.metrics import BACKGROUND_ROW_ERRORS, BACKGROUND_RUNS
from service.tokens.crypto import DecryptionError, SecretBox

log = logging.getLogger(__name__)

R = PendingRevocation.__table__.c  # type: ignore[attr-defined]
_MAX_BACKOFF = timedelta(hours=6)


def _aad(row: PendingRevocation) -> str:
    return f"{row.connection_id}:revocation:{row.id}"


def queue_revocation(session: AsyncSession, box: SecretBox, *, connection_id: uuid.UUID,
                     token: str, reason: str, error: str | None = None) -> uuid.UUID:
    """Queue a revocation in the caller's transaction (the outbox); returns its id."""
    row = PendingRevocation(id=uuid.uuid4(), connection_id=connection_id, token="",
                            reason=reason, last_error=error,
                            next_attempt_at=datetime.now(UTC) + timedelta(seconds=30))
    row.token = box.encrypt(token, _aad(row))
    session.add(row)
    return row.id


async def revoke_queued(sessionmaker: async_sessionmaker[AsyncSession], intuit: IntuitClient,
                        box: SecretBox, ids: list[uuid.UUID]) -> None:
    """Revoke queued revocations now, after the transaction that queued them has committed.
    Nothing is locked while Intuit answers; one that fails stays queued for the background
    worker (revoking twice is harmless: Intuit answers a dead token with 400)."""
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
            log.warning("revocation deferred: %s", type(exc).__name__,
                        extra={"connection_id": str(row.connection_id),
                               "intuit_tid": exc.intuit_tid})
            continue
        async with sessionmaker() as session, session.begin():
            await session.execute(sa.delete(PendingRevocation).where(R.id == revocation_id))
        BACKGROUND_RUNS.labels("revocation", "revoked").inc()


async def revoke_or_queue(session: AsyncSession, intuit: IntuitClient, box: SecretBox, *,
                          connection_id: uuid.UUID, token: str, reason: str) -> bool:
    """Revoke now if Intuit answers; otherwise queue it in this transaction. True if revoked."""
    try:
        await intuit.revoke(token)
        return True
    except IntuitError as exc:
        log.warning("revocation deferred: %s", type(exc).__name__,
                    extra={"connection_id": str(connection_id), "intuit_tid": exc.intuit_tid})
        queue_revocation(session, box, connection_id=connection_id, token=token, reason=reason,
                         error=type(exc).__name__)
        return False


def _back_off(row: PendingRevocation, error: str) -> None:
    row.attempts += 1
    row.last_error = error
    row.next_attempt_at = datetime.now(UTC) + min(
        timedelta(seconds=30 * 2 ** min(row.attempts, 10)), _MAX_BACKOFF)


async def retry_pending_revocations(sessionmaker: async_sessionmaker[AsyncSession],
                                    intuit: IntuitClient, box: SecretBox, *,
                                    batch: int = 20) -> int:
    """One pass over due revocations. Replicas share the work through SKIP LOCKED.

    Only revocations sealed under a key this process has are taken: the others stay queued for
    a replica that has it. One that does not open even so is never dropped: it stays queued,
    retried later, and the failure is logged and counted (qbo_broker_background_row_errors_total).
    """
    done = 0
    async with sessionmaker() as session, session.begin():
        rows = list((await session.execute(
            sa.select(PendingRevocation).where(
                R.next_attempt_at <= sa.func.now(),
                sa.func.split_part(R.token, ".", 1).in_(box.key_ids))
            .order_by(R.next_attempt_at).limit(batch).with_for_update(skip_locked=True)
        )).scalars())
        for row in rows:
            try:
                token = box.decrypt(row.token, _aad(row))
            except DecryptionError as exc:
                log.error("pending revocation %s does not open (%s); kept queued", row.id, exc,
                          extra={"connection_id": str(row.connection_id)})
                BACKGROUND_ROW_ERRORS.labels("revocation", "undecryptable").inc()
                _back_off(row, "DecryptionError")
                continue
            try:
                await intuit.revoke(token)
            except IntuitError as exc:
                _back_off(row, type(exc).__name__)
                BACKGROUND_RUNS.labels("revocation", "deferred").inc()
                continue
            except Exception as exc:  # one row's surprise is not the others' problem
                log.error("pending revocation %s failed: %s; kept queued", row.id,
                          type(exc).__name__, extra={"connection_id": str(row.connection_id)})
                BACKGROUND_ROW_ERRORS.labels("revocation", "error").inc()
                _back_off(row, type(exc).__name__)
                continue
            await session.delete(row)
            done += 1
            BACKGROUND_RUNS.labels("revocation", "revoked").inc()
    return done
