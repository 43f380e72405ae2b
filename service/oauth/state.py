"""Authorization `state`: 256 random bits, stored only as a hash, single-use, 10 minutes.

With it are kept what binds the flow to the request that started it: PKCE's code_verifier
(sealed; the token request needs it back), the OpenID nonce and, in cookie mode, the browser's
binding cookie (both only as SHA-256: they are only ever compared).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.crypto import SecretBox
from service.core.db.models import AuthorizationState
from service.core.errors import ReturnUrlNotAllowed

STATE_TTL = timedelta(minutes=10)
S = AuthorizationState.__table__.c  # type: ignore[attr-defined]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _verifier_aad(state_hash: str) -> str:
    return f"authorization:{state_hash}:pkce"


def _split(url: str) -> tuple[str, str, int, str, str] | None:
    """(scheme, host, port, path, query) of an absolute http(s) URL without userinfo."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    return parts.scheme, parts.hostname.lower(), port or default, parts.path, parts.query


def _origin(url: str) -> str | None:
    split = _split(url)
    return f"{split[0]}://{split[1]}:{split[2]}" if split else None


def check_return_url(return_url: str, allowlist: list[str]) -> str:
    """Accept only absolute http(s) URLs whose origin is on the allowlist, without userinfo or
    fragments. Returns the normalised URL (lower-case host, no default port): what is stored."""
    split = _split(return_url)
    allowed = {o for o in (_origin(entry) for entry in allowlist) if o}
    if (
        split is None
        or f"{split[0]}://{split[1]}:{split[2]}" not in allowed
        or "#" in return_url
        or "\\" in return_url
    ):
        raise ReturnUrlNotAllowed(
            "The return_url's origin is not in BROKER_RETURN_URL_ALLOWLIST, or it carries "
            "credentials or a fragment."
            if allowlist
            else "No return_url is accepted: BROKER_RETURN_URL_ALLOWLIST is empty."
        )
    scheme, host, port, path, query = split
    default = {"http": 80, "https": 443}[scheme]
    netloc = host if port == default else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal keeps its brackets
        netloc = f"[{host}]" if port == default else f"[{host}]:{port}"
    return urlunsplit((scheme, netloc, path or "/", query, ""))


@dataclass(frozen=True)
class StartedAuthorization:
    """What the authorize endpoint hands on: the secrets go to Intuit's URL (state, nonce,
    code challenge) or to the browser (the binding cookie), never to storage in the clear."""

    state: str
    code_verifier: str
    nonce: str
    browser_binding: str | None
    expires_at: datetime


async def create_state(
    session: AsyncSession,
    box: SecretBox,
    *,
    connection_id: uuid.UUID,
    tenant_id: str,
    user_id: str,
    return_url: str | None,
    force: bool,
    bind_browser: bool,
) -> StartedAuthorization:
    state = secrets.token_urlsafe(32)
    state_hash = digest(state)
    started = StartedAuthorization(
        state=state,
        code_verifier=secrets.token_urlsafe(48),
        nonce=secrets.token_urlsafe(24),
        browser_binding=secrets.token_urlsafe(32) if bind_browser else None,
        expires_at=datetime.now(UTC) + STATE_TTL,
    )
    session.add(
        AuthorizationState(
            state_hash=state_hash,
            connection_id=connection_id,
            tenant_id=tenant_id,
            user_id=user_id,
            return_url=return_url,
            force=force,
            expires_at=started.expires_at,
            code_verifier=box.encrypt(started.code_verifier, _verifier_aad(state_hash)),
            nonce_hash=digest(started.nonce),
            browser_binding_hash=digest(started.browser_binding) if started.browser_binding else None,
        )
    )
    # Old, finished states are of no use to anyone.
    await session.execute(
        sa.delete(AuthorizationState).where(S.expires_at < sa.func.now() - sa.text("interval '1 day'"))
    )
    return started


def open_code_verifier(record: AuthorizationState, box: SecretBox) -> str | None:
    if record.code_verifier is None:
        return None
    return box.decrypt(record.code_verifier, _verifier_aad(record.state_hash))


def nonce_matches(nonce_hash: str | None, nonce: object) -> bool:
    if nonce_hash is None:
        return True  # started before nonces were sent
    return isinstance(nonce, str) and hmac.compare_digest(digest(nonce), nonce_hash)


def binding_cookie(connection_id: uuid.UUID) -> str:
    """The cookie that binds a Connect to its browser (cookie mode), one per connection so that
    Connects of two connections in one browser do not overwrite each other's."""
    return f"__Host-qbo-connect-{connection_id}"


def _bound_to(record: AuthorizationState, cookies: Mapping[str, str]) -> bool:
    if record.browser_binding_hash is None:
        return True
    binding = cookies.get(binding_cookie(record.connection_id))
    return binding is not None and hmac.compare_digest(digest(binding), record.browser_binding_hash)


async def consume_state(
    session: AsyncSession,
    state: str,
    *,
    cookies: Mapping[str, str],
) -> tuple[AuthorizationState | None, bool]:
    """Mark the state used. Returns (record, usable): the record is returned even when the state
    was already used or has expired, so the caller knows where to send the browser back.

    A state bound to a browser (cookie mode) that arrives without that browser's cookie is not
    usable and not consumed: a forwarded authorization URL cannot spend it."""
    if not state or len(state) > 200:
        return None, False
    record = (
        await session.execute(
            sa.select(AuthorizationState).where(S.state_hash == digest(state)).with_for_update()
        )
    ).scalar_one_or_none()
    if record is None:
        return None, False
    if not _bound_to(record, cookies):
        return record, False
    usable = record.used_at is None and record.expires_at > datetime.now(UTC)
    if record.used_at is None:
        record.used_at = datetime.now(UTC)
    return record, usable
