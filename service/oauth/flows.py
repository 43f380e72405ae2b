"""The callback as a flow: check state → exchange code → read user and company → apply the
linking rules → store → record. Also the after-the-fact "Connect anyway" (confirm / decline)."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.connections import repository as repo
from service.connections.schemas import Status
from service.db.models import Connection, PendingLink
from service.errors import (
    IntuitRejected,
    IntuitUnavailable,
    InvalidState,
    NoPendingLink,
    NotFound,
    ProblemError,
    QuickBooksAccessDenied,
    QuickBooksCompanyInUse,
    QuickBooksUserBelongsToAnotherUser,
)
from service.intuit import errors as intuit_errors
from service.intuit.client import QuickBooksUser, TokenSet
from service.metrics import LINK_RESULTS
from service.oauth.state import consume_state
from service.runtime import Runtime
from service.tokens import credentials
from service.tokens.revocation import revoke_or_queue

log = logging.getLogger(__name__)

PENDING_LINK_TTL = timedelta(minutes=10)
_REALM_ID = re.compile(r"^[0-9]{1,19}$")

ACCESS_DENIED_MESSAGE = (
    "QuickBooks did not grant access. Only a Master admin or a Company Administrator of the "
    "QuickBooks company can connect it, and they must choose Connect on Intuit's page."
)
USER_BELONGS_MESSAGE = (
    "This QuickBooks user is already linked by another cieTrade user of your company. Each "
    "cieTrade user must connect with their own QuickBooks user: on Intuit's sign-in page choose "
    "\"Not you?\" and sign in as yourself."
)


@dataclass(frozen=True)
class CallbackOutcome:
    result: str  # connected | confirmation_required | error
    connection_id: uuid.UUID | None = None
    return_url: str | None = None
    error: ProblemError | None = None


@dataclass(frozen=True)
class _Grant:
    tokens: TokenSet
    user: QuickBooksUser
    realm_id: str
    company_name: str | None


class CallbackError(ProblemError):
    status, code, title = 400, "invalid_callback", "The callback from Intuit is not valid"


class AuthorizationCodeRejected(ProblemError):
    status, code, title = 400, "authorization_code_rejected", "Intuit rejected the authorization"


async def complete_callback(rt: Runtime, *, state: str | None, code: str | None,
                            realm_id: str | None, error: str | None) -> CallbackOutcome:
    # Rule 1: the state, before any call to Intuit. Consumed in its own transaction so that it
    # stays used whatever happens next.
    async with rt.sessionmaker() as session, session.begin():
        record, usable = await consume_state(session, state or "")
        if record is None:
            return _refused(None, None, InvalidState("The authorization is unknown. Start again "
                                                     "from cieTrade's Integration page."))
        connection_id, return_url = record.connection_id, record.return_url
        user_id, force = record.user_id, record.force
    if not usable:
        return _refused(connection_id, return_url, InvalidState(
            "This authorization was already used or has expired (10 minutes). Start again."))

    try:
        if error:
            raise (QuickBooksAccessDenied(ACCESS_DENIED_MESSAGE) if error == "access_denied"
                   else AuthorizationCodeRejected(f"Intuit answered the error {error[:64]!r}."))
        if not code:
            raise CallbackError("Intuit's callback carries no code.")
        if not realm_id or not _REALM_ID.match(realm_id):
            raise CallbackError("Intuit's callback carries no valid realmId; the accounting "
                                "scope is required.")
        grant = await _obtain_grant(rt, code=code, realm_id=realm_id)
        result = await _apply_linking_rules(rt, connection_id=connection_id, user_id=user_id,
                                            force=force, grant=grant)
    except ProblemError as exc:
        await _record_refusal(rt, connection_id, exc, actor=f"user:{user_id}")
        return _refused(connection_id, return_url, exc)
    LINK_RESULTS.labels(result, "").inc()
    return CallbackOutcome(result=result, connection_id=connection_id, return_url=return_url)


def _refused(connection_id: uuid.UUID | None, return_url: str | None,
             exc: ProblemError) -> CallbackOutcome:
    LINK_RESULTS.labels("error", exc.code).inc()
    return CallbackOutcome(result="error", connection_id=connection_id, return_url=return_url,
                           error=exc)


async def _obtain_grant(rt: Runtime, *, code: str, realm_id: str) -> _Grant:
    try:
        tokens = await rt.intuit.exchange_code(code)
        user = await rt.intuit.userinfo(tokens.access_token)
        company_name = await rt.intuit.company_name(realm_id, tokens.access_token)
    except intuit_errors.IntuitUnavailable as exc:
        raise IntuitUnavailable("Intuit could not be reached to finish the authorization; "
                                "try Connect again in a minute.",
                                retry_after=exc.retry_after or 30) from None
    except intuit_errors.InvalidGrant:
        raise AuthorizationCodeRejected(
            "Intuit did not accept the authorization code (used or expired). "
            "Try Connect again.") from None
    except intuit_errors.IntuitError as exc:
        log.warning("callback: Intuit answer unusable: %s", type(exc).__name__,
                    extra={"intuit_tid": exc.intuit_tid})
        raise IntuitRejected("Intuit's answer could not be used; try Connect again.") from None
    return _Grant(tokens=tokens, user=user, realm_id=realm_id, company_name=company_name)


async def _apply_linking_rules(rt: Runtime, *, connection_id: uuid.UUID, user_id: str,
                               force: bool, grant: _Grant) -> str:
    try:
        async with rt.sessionmaker() as session, session.begin():
            conn = await repo.get_connection(session, connection_id, for_update=True)
            if conn is None:
                raise NotFound("The connection was deleted during the authorization.")
            _check_exclusive_rules(await repo.realm_linked_elsewhere(
                session, realm_id=grant.realm_id, connection_id=conn.id),
                await repo.claimed_by(session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub),
                user_id)
            reasons = _change_reasons(conn, grant)
            if reasons and not force:
                await _hold_pending(session, rt, conn, user_id=user_id, grant=grant,
                                    reasons=reasons)
                return "confirmation_required"
            await _link(session, rt, conn, user_id=user_id, grant=grant, forced=bool(reasons),
                        confirmed=False)
            return "connected"
    except IntegrityError:
        # Another connection linked this company between our check and our write.
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection.") from None


def _check_exclusive_rules(realm_elsewhere: bool, claimant: str | None, user_id: str) -> None:
    if realm_elsewhere:  # rule 2
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection. Disconnect that "
            "connection first.")
    if claimant is not None and claimant != user_id:  # rule 3; force does not override it
        raise QuickBooksUserBelongsToAnotherUser(USER_BELONGS_MESSAGE)


def _change_reasons(conn: Connection, grant: _Grant) -> list[str]:
    """Rule 4: what differs from the connection's previous owner and company."""
    reasons = []
    if conn.owner_qb_sub is not None and conn.owner_qb_sub != grant.user.sub:
        reasons.append("different_quickbooks_user")
    if conn.realm_id is not None and conn.realm_id != grant.realm_id:
        reasons.append("different_quickbooks_company")
    return reasons


async def _discard_pending(session: AsyncSession, rt: Runtime, pending: PendingLink, *,
                           revoke: bool, reason: str) -> None:
    if revoke:
        tokens = credentials.open_pending(pending, rt.box)
        await revoke_or_queue(session, rt.intuit, rt.box, connection_id=pending.connection_id,
                              token=tokens.refresh_token, reason=reason)
    await session.delete(pending)
    await session.flush()


async def _hold_pending(session: AsyncSession, rt: Runtime, conn: Connection, *, user_id: str,
                        grant: _Grant, reasons: list[str]) -> None:
    now = datetime.now(UTC)
    previous = await repo.get_pending_link(session, conn.id, for_update=True)
    if previous is not None:
        # A pending grant for another company would otherwise stay live at Intuit.
        await _discard_pending(session, rt, previous, revoke=previous.realm_id != grant.realm_id,
                               reason="pending_link_replaced")
    pending = PendingLink(
        connection_id=conn.id, user_id=user_id, reasons=reasons, qb_sub=grant.user.sub,
        qb_email=grant.user.email, qb_name=grant.user.name, realm_id=grant.realm_id,
        company_name=grant.company_name, access_token="", refresh_token="",
        access_token_expires_at=now, refresh_token_expires_at=now,
        expires_at=now + PENDING_LINK_TTL)
    credentials.seal_pending(pending, grant.tokens, rt.box, now=now)
    session.add(pending)
    conn.updated_at = now
    await repo.add_event(session, conn, "link_pending", actor=f"user:{user_id}", reasons=reasons,
                         quickbooks_user=_qb_user(grant.user), realm_id=grant.realm_id,
                         company_name=grant.company_name)


def _qb_user(user: QuickBooksUser) -> dict[str, str | None]:
    return {"sub": user.sub, "email": user.email, "name": user.name}


async def _link(session: AsyncSession, rt: Runtime, conn: Connection, *, user_id: str,
                grant: _Grant, forced: bool, confirmed: bool) -> None:
    """Rule 5: the grant becomes the connection's."""
    now = datetime.now(UTC)
    if conn.refresh_token is not None and conn.realm_id != grant.realm_id:
        # The old grant is for another company and would stay live at Intuit. (For the same
        # company Intuit has already replaced it; revoking it could end the new one.)
        await revoke_or_queue(session, rt.intuit, rt.box, connection_id=conn.id,
                              token=credentials.open_refresh_token(conn, rt.box),
                              reason="replaced_by_other_company")
    previous = await repo.get_pending_link(session, conn.id, for_update=True)
    if previous is not None:
        await _discard_pending(session, rt, previous, revoke=previous.realm_id != grant.realm_id,
                               reason="pending_link_replaced")
    credentials.store_tokens(conn, grant.tokens, rt.box, now=now,
                             keepalive_age=timedelta(seconds=rt.settings.keepalive_refresh_age_seconds))
    conn.status = Status.CONNECTED
    conn.realm_id = grant.realm_id
    conn.company_name = grant.company_name
    conn.owner_user_id = user_id
    conn.owner_qb_sub = grant.user.sub
    conn.owner_qb_email = grant.user.email
    conn.owner_qb_name = grant.user.name
    conn.connected_at = now
    conn.updated_at = now
    conn.last_error_code = conn.last_error_message = None
    conn.last_error_at = None
    await repo.claim_quickbooks_user(session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub,
                                     user_id=user_id)
    await repo.add_event(session, conn, "linked", actor=f"user:{user_id}", user_id=user_id,
                         quickbooks_user=_qb_user(grant.user), realm_id=grant.realm_id,
                         company_name=grant.company_name, forced=forced, confirmed=confirmed)
    await session.flush()


async def _record_refusal(rt: Runtime, connection_id: uuid.UUID, exc: ProblemError, *,
                          actor: str) -> None:
    """A refused link leaves the connection as it was, with last_error and an event."""
    async with rt.sessionmaker() as session, session.begin():
        conn = await repo.get_connection(session, connection_id, for_update=True)
        if conn is None:
            return
        now = datetime.now(UTC)
        conn.last_error_code, conn.last_error_message, conn.last_error_at = exc.code, exc.detail, now
        conn.updated_at = now
        await repo.add_event(session, conn, "link_refused", actor=actor, code=exc.code,
                             message=exc.detail)


async def confirm_pending_link(session: AsyncSession, rt: Runtime, conn: Connection, *,
                               actor: str) -> None:
    pending = await repo.get_pending_link(session, conn.id, for_update=True)
    if pending is None or pending.expires_at <= datetime.now(UTC):
        raise NoPendingLink("There is no pending link to confirm (it may have expired after "
                            "10 minutes). Connect again.", connection_id=str(conn.id))
    tokens = credentials.open_pending(pending, rt.box)
    grant = _Grant(tokens=tokens, user=QuickBooksUser(sub=pending.qb_sub, email=pending.qb_email,
                                                       name=pending.qb_name),
                   realm_id=pending.realm_id, company_name=pending.company_name)
    _check_exclusive_rules(
        await repo.realm_linked_elsewhere(session, realm_id=grant.realm_id, connection_id=conn.id),
        await repo.claimed_by(session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub),
        pending.user_id)
    await session.delete(pending)
    await session.flush()
    try:
        async with session.begin_nested():
            await _link(session, rt, conn, user_id=pending.user_id, grant=grant, forced=False,
                        confirmed=True)
    except IntegrityError:
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection.") from None
    await repo.add_event(session, conn, "pending_link_confirmed", actor=actor)


async def decline_pending_link(session: AsyncSession, rt: Runtime, conn: Connection, *,
                               actor: str) -> None:
    pending = await repo.get_pending_link(session, conn.id, for_update=True)
    if pending is None:
        raise NoPendingLink("There is no pending link to decline.", connection_id=str(conn.id))
    await discard_pending_link(session, rt, conn, pending, event="pending_link_declined", actor=actor)


async def discard_pending_link(session: AsyncSession, rt: Runtime, conn: Connection,
                               pending: PendingLink, *, event: str, actor: str) -> None:
    """Revoke the pending grant at Intuit and drop it (declined, or expired after 10 minutes).

    Revoking ends the app's connection to that company at Intuit. When the pending grant is for
    the connection's own company (another admin's "Connect anyway"), Intuit had already retired
    the connection's grant in its favour, so the connection cannot stay `connected`.
    """
    await _discard_pending(session, rt, pending, revoke=True, reason=event)
    now = datetime.now(UTC)
    conn.updated_at = now
    await repo.add_event(session, conn, event, actor=actor, realm_id=pending.realm_id,
                         quickbooks_user_sub=pending.qb_sub)
    if pending.realm_id == conn.realm_id and conn.status == Status.CONNECTED:
        conn.status = Status.REAUTHORIZATION_REQUIRED
        conn.last_error_code = "quickbooks_connection_revoked"
        conn.last_error_message = (
            "Another QuickBooks admin took over this company's connection at Intuit and the "
            "change was not confirmed, so Intuit no longer honours the earlier credentials. "
            "Connect again.")
        conn.last_error_at = now
