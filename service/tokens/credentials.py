"""Where a connection's (and a pending link's) tokens are sealed, opened and wiped."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from service.core.crypto import SecretBox
from service.core.db.models import Connection, HeldGrant, PendingLink
from service.domain import Sealed, sealed_aad
from service.intuit.client import TokenSet

# Keep-alive refreshes a refresh token well before Intuit's rolling expiry.
REFRESH_EXPIRY_MARGIN = timedelta(days=7)


def _aad(connection: Any, purpose: Sealed) -> str:
    """`connection` is a Connection, a PendingLink, a HeldGrant or a row of one."""
    connection_id = (
        connection.connection_id if isinstance(connection, PendingLink | HeldGrant) else connection.id
    )
    return sealed_aad(connection_id, purpose)


def refresh_token_expiry(tokens: TokenSet, now: datetime) -> datetime:
    rolling = now + timedelta(seconds=tokens.refresh_token_expires_in)
    if tokens.refresh_token_hard_expires_in is not None:
        return min(rolling, now + timedelta(seconds=tokens.refresh_token_hard_expires_in))
    return rolling


def sealed_tokens(
    conn: Any, tokens: TokenSet, box: SecretBox, *, now: datetime, keepalive_age: timedelta
) -> dict[str, Any]:
    """The connection's token columns for a new token set (conn: anything with an `id`)."""
    refresh_expires = refresh_token_expiry(tokens, now)
    return {
        "access_token": box.encrypt(tokens.access_token, _aad(conn, Sealed.ACCESS)),
        "refresh_token": box.encrypt(tokens.refresh_token, _aad(conn, Sealed.REFRESH)),
        "access_token_expires_at": now + timedelta(seconds=tokens.expires_in),
        "refresh_token_expires_at": refresh_expires,
        "refresh_token_issued_at": now,
        "last_refreshed_at": now,
        "keepalive_due_at": min(now + keepalive_age, refresh_expires - REFRESH_EXPIRY_MARGIN),
    }


def store_tokens(
    conn: Connection, tokens: TokenSet, box: SecretBox, *, now: datetime, keepalive_age: timedelta
) -> None:
    for column, value in sealed_tokens(conn, tokens, box, now=now, keepalive_age=keepalive_age).items():
        setattr(conn, column, value)


def wipe_tokens(conn: Connection) -> None:
    conn.access_token = None
    conn.refresh_token = None
    conn.access_token_expires_at = None
    conn.refresh_token_expires_at = None
    conn.refresh_token_issued_at = None
    conn.keepalive_due_at = None


def open_access_token(conn: Any, box: SecretBox) -> str:
    assert conn.access_token is not None
    return box.decrypt(conn.access_token, _aad(conn, Sealed.ACCESS))


def open_refresh_token(conn: Any, box: SecretBox) -> str:
    assert conn.refresh_token is not None
    return box.decrypt(conn.refresh_token, _aad(conn, Sealed.REFRESH))


def seal_pending(pending: PendingLink, tokens: TokenSet, box: SecretBox, *, now: datetime) -> None:
    _seal(pending, tokens, box, Sealed.PENDING_ACCESS, Sealed.PENDING_REFRESH, now=now)


def open_pending(pending: PendingLink, box: SecretBox) -> TokenSet:
    """The pending grant's tokens, with lifetimes counted from now (as if just issued)."""
    return _open(pending, box, Sealed.PENDING_ACCESS, Sealed.PENDING_REFRESH)


def seal_held(held: HeldGrant, tokens: TokenSet, box: SecretBox, *, now: datetime) -> None:
    _seal(held, tokens, box, Sealed.HELD_ACCESS, Sealed.HELD_REFRESH, now=now)


def open_held(held: HeldGrant, box: SecretBox) -> TokenSet:
    """A grant held for a completion ticket, with lifetimes counted from now."""
    return _open(held, box, Sealed.HELD_ACCESS, Sealed.HELD_REFRESH)


def _seal(
    grant: PendingLink | HeldGrant,
    tokens: TokenSet,
    box: SecretBox,
    access: Sealed,
    refresh: Sealed,
    *,
    now: datetime,
) -> None:
    grant.access_token = box.encrypt(tokens.access_token, _aad(grant, access))
    grant.refresh_token = box.encrypt(tokens.refresh_token, _aad(grant, refresh))
    grant.access_token_expires_at = now + timedelta(seconds=tokens.expires_in)
    grant.refresh_token_expires_at = refresh_token_expiry(tokens, now)


def _open(grant: PendingLink | HeldGrant, box: SecretBox, access: Sealed, refresh: Sealed) -> TokenSet:
    now = datetime.now(grant.expires_at.tzinfo)
    return TokenSet(
        access_token=box.decrypt(grant.access_token, _aad(grant, access)),
        refresh_token=box.decrypt(grant.refresh_token, _aad(grant, refresh)),
        expires_in=max(0, int((grant.access_token_expires_at - now).total_seconds())),
        refresh_token_expires_in=max(0, int((grant.refresh_token_expires_at - now).total_seconds())),
        refresh_token_hard_expires_in=None,
    )
