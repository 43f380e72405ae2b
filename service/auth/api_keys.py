"""Service API keys: random, shown once, stored as SHA-256 hashes with their scopes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.callers import Scope
from service.core.db.models import ApiKey

_PREFIX = "qbk"
# Keys are about 60 characters; longer values are refused before they are hashed or looked up.
MAX_API_KEY_CHARS = 200
_TOUCH_EVERY = timedelta(minutes=5)


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def validate_scopes(scopes: list[str]) -> list[str]:
    valid = {scope.value for scope in Scope}
    unknown = [scope for scope in scopes if scope not in valid]
    if unknown or not scopes:
        raise ValueError(f"unknown or missing scopes {unknown}; choose from {sorted(valid)}")
    return sorted(set(scopes))


async def create_api_key(session: AsyncSession, *, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    prefix = secrets.token_hex(4)
    key = f"{_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(name=name, prefix=prefix, key_hash=hash_key(key), scopes=validate_scopes(scopes))
    session.add(row)
    await session.flush()
    return row, key


async def find_active_key(session: AsyncSession, key: str) -> ApiKey | None:
    row = (
        await session.execute(
            sa.select(ApiKey).where(
                ApiKey.key_hash == hash_key(key),  # type: ignore[arg-type]
                ApiKey.revoked_at.is_(None),  # type: ignore[union-attr]
            )
        )
    ).scalar_one_or_none()
    if row is not None:
        now = datetime.now(UTC)
        if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:
            row.last_used_at = now
    return row


async def list_api_keys(session: AsyncSession) -> list[ApiKey]:
    created = ApiKey.__table__.c.created_at  # type: ignore[attr-defined]
    return list((await session.execute(sa.select(ApiKey).order_by(created))).scalars())


async def revoke_api_key(session: AsyncSession, key_id: uuid.UUID) -> bool:
    result = await session.execute(
        sa.update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))  # type: ignore[arg-type,union-attr]
        .values(revoked_at=sa.func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
