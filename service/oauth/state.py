"""Authorization `state`: 256 random bits, stored only as a hash, single-use, 10 minutes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import AuthorizationState
from service.errors import ReturnUrlNotAllowed

STATE_TTL = timedelta(minutes=10)
S = AuthorizationState.__table__.c  # type: ignore[attr-defined]


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _origin(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{parts.hostname.lower()}:{port or default}"


def check_return_url(return_url: str, allowlist: list[str]) -> str:
    """Accept only absolute http(s) URLs whose origin is on the allowlist, without fragments."""
    origin = _origin(return_url)
    allowed = {o for o in (_origin(entry) for entry in allowlist) if o}
    if origin is None or origin not in allowed or "#" in return_url or "\\" in return_url:
        raise ReturnUrlNotAllowed(
            "The return_url's origin is not in BROKER_RETURN_URL_ALLOWLIST."
            if allowlist else "No return_url is accepted: BROKER_RETURN_URL_ALLOWLIST is empty.")
    return return_url


async def create_state(session: AsyncSession, *, connection_id: uuid.UUID, tenant_id: str,
                       user_id: str, return_url: str | None, force: bool) -> tuple[str, datetime]:
    state = secrets.token_urlsafe(32)
    expires_at = datetime.now(UTC) + STATE_TTL
    session.add(AuthorizationState(
        state_hash=_hash(state), connection_id=connection_id, tenant_id=tenant_id,
        user_id=user_id, return_url=return_url, force=force, expires_at=expires_at))
    # Old, finished states are of no use to anyone.
    await session.execute(sa.delete(AuthorizationState).where(
        S.expires_at < sa.func.now() - sa.text("interval '1 day'")))
    return state, expires_at


async def consume_state(session: AsyncSession, state: str) -> tuple[AuthorizationState | None, bool]:
    """Mark the state used. Returns (record, usable): the record is returned even when the state
    was already used or has expired, so the caller knows where to send the browser back."""
    if not state or len(state) > 200:
        return None, False
    record = (await session.execute(
        sa.select(AuthorizationState).where(S.state_hash == _hash(state)).with_for_update()
    )).scalar_one_or_none()
    if record is None:
        return None, False
    usable = record.used_at is None and record.expires_at > datetime.now(UTC)
    if record.used_at is None:
        record.used_at = datetime.now(UTC)
    return record, usable
