"""The callback as a flow: check state → exchange code → read user and company → apply the
linking rules → store → record. Also the after-the-fact "Connect anyway" (confirm / decline)."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.callers import Caller, Scope
from service.core.crypto import DecryptionError
from service.core.db.engine import transaction
from service.core.db.models import Connection, HeldGrant, PendingLink
from service.core.errors import (
    AuthorizationCodeRejected,
    CallbackError,
    CompletionNotAllowed,
    IdentityNotVerified,
    IntuitRejected,
    IntuitUnavailableProblem,
    InvalidState,
    NoPendingLink,
    NotFound,
    ProblemError,
    QuickBooksAccessDenied,
    QuickBooksCompanyInUse,
    QuickBooksUserBelongsToAnotherUser,
)
from service.core.metrics import BACKGROUND_ROW_ERRORS, LINK_RESULTS
from service.domain import Status
from service.events import outbox
from service.intuit import errors as intuit_errors
from service.intuit.client import QuickBooksUser, TokenSet
from service.metering.meter import outcome_for_status
from service.metering.throttle import QuickBooksThrottled
from service.oauth.state import consume_state, digest, nonce_matches, open_code_verifier
from service.runtime import Runtime
from service.store import connections as repo
from service.tokens import credentials
from service.tokens.revocation import queue_revocation, revoke_after_commit, revoke_queued

log = logging.getLogger(__name__)

PENDING_LINK_TTL = timedelta(minutes=10)
COMPLETION_TICKET_TTL = timedelta(minutes=10)
H = HeldGrant.__table__.c  # type: ignore[attr-defined]
_REALM_ID = re.compile(r"^[0-9]{1,19}$")

ACCESS_DENIED_MESSAGE = (
    "QuickBooks did not grant access. Only a Master admin or a Company Administrator of the "
    "QuickBooks company can connect it, and they must choose Connect on Intuit's page."
)
USER_BELONGS_MESSAGE = (
    "This QuickBooks user is already linked by another cieTrade user of your company. Each "
    "cieTrade user must connect with their own QuickBooks user: on Intuit's sign-in page choose "
    '"Not you?" and sign in as yourself.'
)


@dataclass(frozen=True)
class CallbackOutcome:
    result: str  # connected | confirmation_required | completion_required | error
    connection_id: uuid.UUID | None = None
    return_url: str | None = None
    error: ProblemError | None = None
    completion_ticket: str | None = None


@dataclass(frozen=True)
class _Grant:
    tokens: TokenSet
    user: QuickBooksUser
    realm_id: str
    company_name: str | None


@dataclass(frozen=True)
class _Started:
    """What the callback needs of its authorization state, read inside its transaction."""

    connection_id: uuid.UUID
    tenant_id: str
    user_id: str
    force: bool
    return_url: str | None
    code_verifier: str | None
    nonce_hash: str | None


# Intuit's `error` parameter is never echoed: stored text reaches cieTrade's pages.
_INTUIT_ERRORS: dict[str, tuple[type[ProblemError], str]] = {
    "access_denied": (QuickBooksAccessDenied, ACCESS_DENIED_MESSAGE),
    "invalid_scope": (
        AuthorizationCodeRejected,
        "Intuit refused the requested permissions. Try Connect again, or ask "
        "your administrator to check the app's settings.",
    ),
    "server_error": (
        AuthorizationCodeRejected,
        "Intuit could not complete the authorization. Try Connect again.",
    ),
    "temporarily_unavailable": (
        AuthorizationCodeRejected,
        "Intuit could not complete the authorization. Try Connect again.",
    ),
}
_OTHER_INTUIT_ERROR = (
    AuthorizationCodeRejected,
    "Intuit did not complete the authorization. Try Connect again.",
)


def _intuit_error(error: str) -> ProblemError:
    problem, message = _INTUIT_ERRORS.get(error, _OTHER_INTUIT_ERROR)
    return problem(message)


async def complete_callback(
    rt: Runtime,
    *,
    state: str | None,
    code: str | None,
    realm_id: str | None,
    error: str | None,
    cookies: Mapping[str, str],
) -> CallbackOutcome:
    # Rule 1: the state, before any call to Intuit. Consumed in its own transaction so that it
    # stays used whatever happens next.
    async with rt.sessionmaker() as session, session.begin():
        record, usable = await consume_state(session, state or "", cookies=cookies)
        if record is None:
            return _refused(
                None,
                None,
                InvalidState("The authorization is unknown. Start again from cieTrade's Integration page."),
            )
        started = _Started(
            connection_id=record.connection_id,
            tenant_id=record.tenant_id,
            user_id=record.user_id,
            force=record.force,
            return_url=record.return_url,
            code_verifier=open_code_verifier(record, rt.box) if usable else None,
            nonce_hash=record.nonce_hash,
        )
        if usable:
            record.code_verifier = None  # needed once, for the exchange below
    if not usable or (rt.settings.connect_binding == "ticket" and started.return_url is None):
        # (A state without a return_url can only predate ticket mode: its ticket would be lost.)
        return _refused(
            started.connection_id,
            started.return_url,
            InvalidState(
                "This authorization was already used, has expired (10 minutes), or was started in "
                "another browser. Start again from cieTrade's Integration page."
            ),
        )

    grant: _Grant | None = None
    try:
        if error:
            raise _intuit_error(error)
        if not code:
            raise CallbackError("Intuit's callback carries no code.")
        if not realm_id or not _REALM_ID.match(realm_id):
            raise CallbackError(
                "Intuit's callback carries no valid realmId; the accounting scope is required."
            )
        # Rule 2 before the code is exchanged: a new grant for a company that another
        # connection holds would retire that connection's grant at Intuit (one per company).
        async with rt.sessionmaker() as session:
            if await repo.realm_linked_elsewhere(
                session, realm_id=realm_id, connection_id=started.connection_id
            ):
                raise _company_in_use()
        grant = await _obtain_grant(rt, code=code, realm_id=realm_id, started=started)
        if rt.settings.connect_binding == "ticket":
            ticket = await _hold_grant(rt, started, grant)
            LINK_RESULTS.labels("completion_required", "").inc()
            return CallbackOutcome(
                result="completion_required",
                connection_id=started.connection_id,
                return_url=started.return_url,
                completion_ticket=ticket,
            )
        result = await _apply_linking_rules(
            rt, connection_id=started.connection_id, user_id=started.user_id, force=started.force, grant=grant
        )
    except ProblemError as exc:
        await _record_refusal(
            rt, started.connection_id, exc, actor=f"user:{started.user_id}", refused_grant=grant
        )
        return _refused(started.connection_id, started.return_url, exc)
    LINK_RESULTS.labels(result, "").inc()
    return CallbackOutcome(result=result, connection_id=started.connection_id, return_url=started.return_url)


def _company_in_use() -> QuickBooksCompanyInUse:
    return QuickBooksCompanyInUse(
        "This QuickBooks company is already linked by another connection. Disconnect that connection first."
    )


def _refused(connection_id: uuid.UUID | None, return_url: str | None, exc: ProblemError) -> CallbackOutcome:
    LINK_RESULTS.labels("error", exc.code).inc()
    return CallbackOutcome(result="error", connection_id=connection_id, return_url=return_url, error=exc)


async def _obtain_grant(rt: Runtime, *, code: str, realm_id: str, started: _Started) -> _Grant:
    try:
        tokens = await rt.intuit.exchange_code(code, code_verifier=started.code_verifier)
    except intuit_errors.InvalidGrant:
        raise AuthorizationCodeRejected(
            "Intuit did not accept the authorization code (used or expired). Try Connect again."
        ) from None
    except intuit_errors.IntuitError as exc:
        raise _unavailable_or_rejected(exc) from None
    # From here on a grant exists at Intuit: whatever refuses it must revoke it.
    try:
        user = await rt.intuit.userinfo(tokens.access_token)
        if tokens.id_token is not None:
            claims = await rt.intuit.verify_id_token(tokens.id_token, nonce=None)
            if not nonce_matches(started.nonce_hash, claims.get("nonce")):
                raise intuit_errors.InvalidIdToken("the id_token's nonce does not match")
            if claims.get("sub") != user.sub:
                raise intuit_errors.InvalidIdToken("the id_token and userinfo name other users")
        company_name = await _company_name(rt, started.tenant_id, realm_id, tokens.access_token)
    except intuit_errors.InvalidIdToken as exc:
        log.warning("callback: id_token refused: %s", exc)
        await _revoke_refused_grant(rt, started.connection_id, tokens, "id_token_not_verified")
        raise IdentityNotVerified(
            "Intuit's identity token for this sign-in did not verify, so "
            "nothing was linked. Try Connect again."
        ) from None
    except intuit_errors.IntuitError as exc:
        await _revoke_refused_grant(rt, started.connection_id, tokens, "callback_failed")
        raise _unavailable_or_rejected(exc) from None
    return _Grant(tokens=tokens, user=user, realm_id=realm_id, company_name=company_name)


async def _company_name(rt: Runtime, tenant_id: str, realm_id: str, access_token: str) -> str | None:
    """The company's name, read within the company's limits (Intuit counts the read against
    them like any gateway call) and metered; None if the limits leave no room for it within
    the gateway's queueing time: the link does not wait on a name it can do without."""
    try:
        return await rt.intuit.company_name(
            realm_id,
            access_token,
            on_sent=lambda status: rt.meter.record(
                tenant_id,
                realm_id,
                "coreplus",
                "network_error" if status is None else outcome_for_status(status),
            ),
            admitted=lambda: rt.throttle.admitted(
                realm_id, wait_seconds=rt.settings.quickbooks_queue_seconds
            ),
            # Every replica holds the company's calls back, as after a gateway call's 429.
            on_throttled=lambda retry_after: rt.throttle.paused_by_intuit(realm_id, retry_after),
        )
    except QuickBooksThrottled:
        log.warning("callback: the company's limits left no room to read its name; linked without it")
        return None


def _unavailable_or_rejected(exc: intuit_errors.IntuitError) -> ProblemError:
    if isinstance(exc, intuit_errors.IntuitUnavailable):
        return IntuitUnavailableProblem(
            "Intuit could not be reached to finish the authorization; try Connect again in a minute.",
            retry_after=exc.retry_after or 30,
        )
    log.warning(
        "callback: Intuit answer unusable: %s", type(exc).__name__, extra={"intuit_tid": exc.intuit_tid}
    )
    return IntuitRejected("Intuit's answer could not be used; try Connect again.")


async def _revoke_refused_grant(rt: Runtime, connection_id: uuid.UUID, tokens: TokenSet, reason: str) -> None:
    """Queue the grant's revocation (so it survives a crash), then revoke it after commit."""
    async with rt.sessionmaker() as session, session.begin():
        queued = queue_revocation(
            session, rt.box, connection_id=connection_id, token=tokens.refresh_token, reason=reason
        )
    await revoke_queued(rt.sessionmaker, rt.intuit, rt.box, [queued])


async def _hold_grant(rt: Runtime, started: _Started, grant: _Grant) -> str:
    """Keep the grant until the user who started Connect redeems the ticket (ticket mode)."""
    ticket = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    held = HeldGrant(
        ticket_hash=digest(ticket),
        connection_id=started.connection_id,
        tenant_id=started.tenant_id,
        user_id=started.user_id,
        force=started.force,
        qb_sub=grant.user.sub,
        qb_email=grant.user.email,
        qb_name=grant.user.name,
        realm_id=grant.realm_id,
        company_name=grant.company_name,
        access_token="",
        refresh_token="",
        access_token_expires_at=now,
        refresh_token_expires_at=now,
        expires_at=now + COMPLETION_TICKET_TTL,
    )
    credentials.seal_held(held, grant.tokens, rt.box, now=now)
    async with rt.sessionmaker() as session, session.begin():
        session.add(held)
    return ticket


async def complete_with_ticket(
    rt: Runtime, caller: Caller, *, connection_id: uuid.UUID, ticket: str, user_id: str | None
) -> str:
    """Finish Connect in ticket mode: the caller must be the user (or a service naming the user)
    who started it. Runs the linking rules; returns `connected` or `confirmation_required`."""
    refusal: ProblemError | None = None
    async with transaction(rt.sessionmaker) as session:
        held = (
            (
                await session.execute(
                    sa.select(HeldGrant).where(H.ticket_hash == digest(ticket)).with_for_update()
                )
            ).scalar_one_or_none()
            if 0 < len(ticket) <= 200
            else None
        )
        if held is None or held.connection_id != connection_id or held.expires_at <= datetime.now(UTC):
            # Without a live ticket the caller learns no more than any request tells it: a
            # connection it may not see is not found.
            conn = await repo.get_connection(session, connection_id)
            if conn is None:
                raise NotFound("No such connection.", connection_id=str(connection_id))
            caller.can_write(conn.tenant_id)
            raise InvalidState(
                "This completion ticket is unknown, used or expired (10 minutes). Start Connect again.",
                connection_id=str(connection_id),
            )
        _check_ticket_holder(caller, held, user_id)
        grant = _Grant(
            tokens=credentials.open_held(held, rt.box),
            user=QuickBooksUser(sub=held.qb_sub, email=held.qb_email, name=held.qb_name),
            realm_id=held.realm_id,
            company_name=held.company_name,
        )
        await session.delete(held)  # single use, whatever the rules decide
        await session.flush()
        try:
            async with session.begin_nested():
                result = await _link_or_hold(
                    session,
                    rt,
                    connection_id=connection_id,
                    user_id=held.user_id,
                    force=held.force,
                    grant=grant,
                )
        except ProblemError as exc:
            refusal = exc
    if refusal is not None:
        await _record_refusal(rt, connection_id, refusal, actor=caller.actor, refused_grant=grant)
        LINK_RESULTS.labels("error", refusal.code).inc()
        raise refusal
    LINK_RESULTS.labels(result, "").inc()
    return result


def _check_ticket_holder(caller: Caller, held: HeldGrant, user_id: str | None) -> None:
    if caller.is_user:
        allowed = caller.tenant_id == held.tenant_id and caller.subject == held.user_id
    else:
        caller.require_scope(Scope.CONNECTIONS_WRITE)
        allowed = user_id is not None and hmac.compare_digest(user_id.encode(), held.user_id.encode())
    if not allowed:
        raise CompletionNotAllowed(
            "Only the cieTrade user who started this Connect can finish it. Start Connect again "
            "from your own Integration page.",
            connection_id=str(held.connection_id),
        )


async def _apply_linking_rules(
    rt: Runtime, *, connection_id: uuid.UUID, user_id: str, force: bool, grant: _Grant
) -> str:
    async with transaction(rt.sessionmaker) as session:
        return await _link_or_hold(
            session, rt, connection_id=connection_id, user_id=user_id, force=force, grant=grant
        )


async def _link_or_hold(
    session: AsyncSession, rt: Runtime, *, connection_id: uuid.UUID, user_id: str, force: bool, grant: _Grant
) -> str:
    """Rules 2 to 5 on a held grant, in the caller's transaction."""
    try:
        conn = await repo.get_connection(session, connection_id, for_update=True)
        if conn is None:
            raise NotFound("The connection was deleted during the authorization.")
        _check_exclusive_rules(
            await repo.realm_linked_elsewhere(session, realm_id=grant.realm_id, connection_id=conn.id),
            await repo.claimed_by(session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub),
            user_id,
        )
        reasons = _change_reasons(conn, grant)
        if reasons and not force:
            await _hold_pending(session, rt, conn, user_id=user_id, grant=grant, reasons=reasons)
            return "confirmation_required"
        await _link(session, rt, conn, user_id=user_id, grant=grant, forced=bool(reasons), confirmed=False)
        return "connected"
    except IntegrityError:
        # Another connection linked this company between our check and our write.
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection."
        ) from None


async def expire_held_grants(rt: Runtime, *, batch: int = 50) -> int:
    """Grants whose completion ticket was never redeemed: revoke them at Intuit (queued in the
    transaction that drops them, revoked after it commits)."""
    async with rt.sessionmaker() as session, session.begin():
        rows = list(
            (
                await session.execute(
                    sa.select(HeldGrant)
                    .where(H.expires_at <= sa.func.now())
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).scalars()
        )
        queued = []
        for held in rows:
            try:
                token = credentials.open_held(held, rt.box).refresh_token
            except DecryptionError:
                # Sealed under a key this replica lacks: leave it for one that has the key.
                log.error("held grant for connection %s cannot be decrypted here; kept", held.connection_id)
                BACKGROUND_ROW_ERRORS.labels("held_grant", "undecryptable").inc()
                continue
            queued.append(
                queue_revocation(
                    session,
                    rt.box,
                    connection_id=held.connection_id,
                    token=token,
                    reason="completion_ticket_expired",
                )
            )
            await session.delete(held)
    await revoke_queued(rt.sessionmaker, rt.intuit, rt.box, queued)
    return len(queued)


def _check_exclusive_rules(realm_elsewhere: bool, claimant: str | None, user_id: str) -> None:
    if realm_elsewhere:  # rule 2
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection. Disconnect that "
            "connection first."
        )
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


async def _discard_pending(
    session: AsyncSession, rt: Runtime, pending: PendingLink, *, revoke: bool, reason: str
) -> None:
    if revoke:
        tokens = credentials.open_pending(pending, rt.box)
        revoke_after_commit(
            session,
            rt.sessionmaker,
            rt.intuit,
            rt.box,
            connection_id=pending.connection_id,
            token=tokens.refresh_token,
            reason=reason,
        )
    await session.delete(pending)
    await session.flush()


async def _hold_pending(
    session: AsyncSession, rt: Runtime, conn: Connection, *, user_id: str, grant: _Grant, reasons: list[str]
) -> None:
    now = datetime.now(UTC)
    previous = await repo.get_pending_link(session, conn.id, for_update=True)
    if previous is not None:
        # A pending grant for another company would otherwise stay live at Intuit.
        await _discard_pending(
            session, rt, previous, revoke=previous.realm_id != grant.realm_id, reason="pending_link_replaced"
        )
    pending = PendingLink(
        connection_id=conn.id,
        user_id=user_id,
        reasons=reasons,
        qb_sub=grant.user.sub,
        qb_email=grant.user.email,
        qb_name=grant.user.name,
        realm_id=grant.realm_id,
        company_name=grant.company_name,
        access_token="",
        refresh_token="",
        access_token_expires_at=now,
        refresh_token_expires_at=now,
        expires_at=now + PENDING_LINK_TTL,
    )
    credentials.seal_pending(pending, grant.tokens, rt.box, now=now)
    session.add(pending)
    conn.updated_at = now
    await repo.add_event(
        session,
        conn,
        "link_pending",
        actor=f"user:{user_id}",
        reasons=reasons,
        quickbooks_user=_qb_user(grant.user),
        realm_id=grant.realm_id,
        company_name=grant.company_name,
    )


def _qb_user(user: QuickBooksUser) -> dict[str, str | None]:
    return {"sub": user.sub, "email": user.email, "name": user.name}


async def _link(
    session: AsyncSession,
    rt: Runtime,
    conn: Connection,
    *,
    user_id: str,
    grant: _Grant,
    forced: bool,
    confirmed: bool,
) -> None:
    """Rule 5: the grant becomes the connection's."""
    now = datetime.now(UTC)
    if conn.refresh_token is not None and conn.realm_id != grant.realm_id:
        # The old grant is for another company and would stay live at Intuit. (For the same
        # company Intuit has already replaced it; revoking it could end the new one.)
        revoke_after_commit(
            session,
            rt.sessionmaker,
            rt.intuit,
            rt.box,
            connection_id=conn.id,
            token=credentials.open_refresh_token(conn, rt.box),
            reason="replaced_by_other_company",
        )
    previous = await repo.get_pending_link(session, conn.id, for_update=True)
    if previous is not None:
        await _discard_pending(
            session, rt, previous, revoke=previous.realm_id != grant.realm_id, reason="pending_link_replaced"
        )
    credentials.store_tokens(
        conn,
        grant.tokens,
        rt.box,
        now=now,
        keepalive_age=timedelta(seconds=rt.settings.keepalive_refresh_age_seconds),
    )
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
    await repo.claim_quickbooks_user(
        session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub, user_id=user_id
    )
    await repo.add_event(
        session,
        conn,
        "linked",
        actor=f"user:{user_id}",
        user_id=user_id,
        quickbooks_user=_qb_user(grant.user),
        realm_id=grant.realm_id,
        company_name=grant.company_name,
        forced=forced,
        confirmed=confirmed,
    )
    await session.flush()


async def _record_refusal(
    rt: Runtime,
    connection_id: uuid.UUID,
    exc: ProblemError,
    *,
    actor: str,
    refused_grant: _Grant | None = None,
) -> None:
    """A refused link leaves the connection as it was, with last_error and an event. A grant
    obtained for it is revoked: queued here, revoked once this transaction has committed."""
    queued: list[uuid.UUID] = []
    async with rt.sessionmaker() as session, session.begin():
        if refused_grant is not None:
            queued.append(
                queue_revocation(
                    session,
                    rt.box,
                    connection_id=connection_id,
                    token=refused_grant.tokens.refresh_token,
                    reason="link_refused",
                )
            )
        conn = await repo.get_connection(session, connection_id, for_update=True)
        if conn is not None:
            now = datetime.now(UTC)
            conn.last_error_code, conn.last_error_message = exc.code, exc.detail
            conn.last_error_at = conn.updated_at = now
            await repo.add_event(
                session, conn, "link_refused", actor=actor, code=exc.code, message=exc.detail
            )
    await revoke_queued(rt.sessionmaker, rt.intuit, rt.box, queued)


async def confirm_pending_link(session: AsyncSession, rt: Runtime, conn: Connection, *, actor: str) -> None:
    pending = await repo.get_pending_link(session, conn.id, for_update=True)
    if pending is None or pending.expires_at <= datetime.now(UTC):
        raise NoPendingLink(
            "There is no pending link to confirm (it may have expired after 10 minutes). Connect again.",
            connection_id=str(conn.id),
        )
    tokens = credentials.open_pending(pending, rt.box)
    grant = _Grant(
        tokens=tokens,
        user=QuickBooksUser(sub=pending.qb_sub, email=pending.qb_email, name=pending.qb_name),
        realm_id=pending.realm_id,
        company_name=pending.company_name,
    )
    _check_exclusive_rules(
        await repo.realm_linked_elsewhere(session, realm_id=grant.realm_id, connection_id=conn.id),
        await repo.claimed_by(session, tenant_id=conn.tenant_id, qb_sub=grant.user.sub),
        pending.user_id,
    )
    await session.delete(pending)
    await session.flush()
    try:
        async with session.begin_nested():
            await _link(session, rt, conn, user_id=pending.user_id, grant=grant, forced=False, confirmed=True)
    except IntegrityError:
        raise QuickBooksCompanyInUse(
            "This QuickBooks company is already linked by another connection."
        ) from None
    await repo.add_event(session, conn, "pending_link_confirmed", actor=actor)


async def decline_pending_link(session: AsyncSession, rt: Runtime, conn: Connection, *, actor: str) -> None:
    pending = await repo.get_pending_link(session, conn.id, for_update=True)
    if pending is None:
        raise NoPendingLink("There is no pending link to decline.", connection_id=str(conn.id))
    await discard_pending_link(session, rt, conn, pending, event="pending_link_declined", actor=actor)


async def discard_pending_link(
    session: AsyncSession, rt: Runtime, conn: Connection, pending: PendingLink, *, event: str, actor: str
) -> None:
    """Revoke the pending grant at Intuit and drop it (declined, or expired after 10 minutes).

    Revoking ends the app's connection to that company at Intuit. When the pending grant is for
    the connection's own company (another admin's "Connect anyway"), Intuit had already retired
    the connection's grant in its favour, so the connection cannot stay `connected`.
    """
    await _discard_pending(session, rt, pending, revoke=True, reason=event)
    now = datetime.now(UTC)
    conn.updated_at = now
    lost_grant = pending.realm_id == conn.realm_id and conn.status == Status.CONNECTED
    if lost_grant:
        conn.status = Status.REAUTHORIZATION_REQUIRED
        conn.last_error_code = "quickbooks_connection_revoked"
        conn.last_error_message = (
            "Another QuickBooks admin took over this company's connection at Intuit and the "
            "change was not confirmed, so Intuit no longer honours the earlier credentials. "
            "Connect again."
        )
        conn.last_error_at = now
    await repo.add_event(
        session, conn, event, actor=actor, realm_id=pending.realm_id, quickbooks_user_sub=pending.qb_sub
    )
    if lost_grant:
        await outbox.emit_for_connection(session, outbox.CONNECTION_REAUTHORIZATION_REQUIRED, conn)
