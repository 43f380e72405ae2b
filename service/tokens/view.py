"""The token endpoint's read model: a connection as GET /connections/{id}/token needs it
(cacheable between changes of the row), the token it answers with, and the checks it makes
before any refresh."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from service.core.crypto import SecretBox
from service.core.errors import NotConnected, ReauthorizationRequired
from service.domain import Status
from service.store.connections import ConnectionRow
from service.tokens import credentials
from service.tokens.schemas import AccessTokenOut

# An access token handed out is valid at least this long.
MIN_VALIDITY = timedelta(minutes=5)


class _Usable(Protocol):
    """What the checks read of a connection (a ConnectionView or a row of the table)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def status(self) -> str: ...
    @property
    def refresh_token(self) -> object: ...  # stored (sealed), or whether one is
    @property
    def access_token(self) -> str | None: ...
    @property
    def access_token_expires_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    realm_id: str

    def __repr__(self) -> str:
        return f"AccessToken(realm_id={self.realm_id!r}, expires_at={self.expires_at!r})"

    def body(self, api_base_url: str) -> bytes:
        """The token endpoint's JSON answer."""
        return (
            AccessTokenOut(
                access_token=self.access_token,
                token_type="bearer",  # noqa: S106
                expires_at=self.expires_at,
                realm_id=self.realm_id,
                api_base_url=api_base_url,
            )
            .model_dump_json()
            .encode()
        )


@dataclass(frozen=True)
class ConnectionView:
    """What the token endpoint needs of a connection, with the access token opened: cacheable
    (service.core.cache) between changes of the row."""

    id: uuid.UUID
    tenant_id: str
    status: str
    realm_id: str | None
    refresh_token: bool  # whether one is stored
    access_token: str | None
    access_token_expires_at: datetime | None

    @classmethod
    def of(cls, conn: ConnectionRow, box: SecretBox) -> ConnectionView:
        """From a row of the connections table."""
        opened = (
            credentials.open_access_token(conn, box)
            if conn.access_token is not None and conn.status == Status.CONNECTED
            else None
        )
        return cls(
            id=conn.id,
            tenant_id=conn.tenant_id,
            status=conn.status,
            realm_id=conn.realm_id,
            refresh_token=conn.refresh_token is not None,
            access_token=opened,
            access_token_expires_at=conn.access_token_expires_at,
        )

    def __repr__(self) -> str:
        return f"ConnectionView(id={self.id}, status={self.status!r})"


def fresh_enough(conn: _Usable, now: datetime) -> bool:
    return (
        conn.access_token is not None
        and conn.access_token_expires_at is not None
        and conn.access_token_expires_at - now >= MIN_VALIDITY
    )


def usable_or_raise(conn: _Usable) -> None:
    if conn.status == Status.REAUTHORIZATION_REQUIRED:
        raise ReauthorizationRequired(
            "QuickBooks refused this connection's credentials; a user must Connect again.",
            connection_id=str(conn.id),
            connection_status=conn.status,
        )
    if conn.status != Status.CONNECTED or not conn.refresh_token:
        raise NotConnected(
            "The connection is not connected to QuickBooks.",
            connection_id=str(conn.id),
            connection_status=conn.status,
        )
