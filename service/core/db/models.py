"""The broker's tables. Secrets are stored only as ciphertext (see service.core.crypto)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel

TZ = sa.DateTime(timezone=True)


def _now_field() -> Any:
    # Set in Python (so new objects need no refresh) and defaulted in SQL (for raw inserts).
    return Field(
        default_factory=lambda: datetime.now(UTC),
        sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now()),
    )


def _ts(nullable: bool = True, **kwargs: Any) -> Any:
    return Field(default=None, sa_column=sa.Column(TZ, nullable=nullable, **kwargs))


class Connection(SQLModel, table=True):
    __tablename__ = "connections"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('pending', 'connected', 'reauthorization_required', 'disconnected')",
            name="connections_status_check",
        ),
        sa.Index(
            "ix_connections_tenant_created", "tenant_id", sa.text("created_at DESC"), sa.text("id DESC")
        ),
        # One live link per QuickBooks company, as at Intuit: a race of two callbacks loses here.
        sa.Index(
            "uq_connections_live_realm",
            "realm_id",
            unique=True,
            postgresql_where=sa.text("status IN ('connected', 'reauthorization_required')"),
        ),
        sa.Index(
            "ix_connections_keepalive_due",
            "keepalive_due_at",
            postgresql_where=sa.text("status = 'connected'"),
        ),
        sa.Index(
            "ix_connections_access_expiry",
            "access_token_expires_at",
            postgresql_where=sa.text("status = 'connected'"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    status: str = Field(default="pending", sa_column=sa.Column(sa.Text, nullable=False))
    realm_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    company_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_user_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_qb_sub: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_qb_email: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_qb_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    module_ar: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    module_ap: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    access_token: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    refresh_token: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    access_token_expires_at: datetime | None = _ts()
    refresh_token_expires_at: datetime | None = _ts()
    refresh_token_issued_at: datetime | None = _ts()
    keepalive_due_at: datetime | None = _ts()
    last_refreshed_at: datetime | None = _ts()
    connected_at: datetime | None = _ts()
    disconnected_at: datetime | None = _ts()
    last_error_code: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_error_at: datetime | None = _ts()
    created_at: datetime = _now_field()
    updated_at: datetime = _now_field()


class PendingLink(SQLModel, table=True):
    """Credentials of a different QuickBooks user or company, held until a user confirms."""

    __tablename__ = "pending_links"
    __table_args__ = (sa.Index("ix_pending_links_expires", "expires_at"),)

    connection_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
        )
    )
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    reasons: list[str] = Field(sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
    qb_sub: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    qb_email: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    qb_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    realm_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    company_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    access_token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    refresh_token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    access_token_expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    refresh_token_expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    created_at: datetime = _now_field()


class AuthorizationState(SQLModel, table=True):
    """A pending authorization: the `state` sent to Intuit, stored only as its SHA-256."""

    __tablename__ = "authorization_states"
    __table_args__ = (sa.Index("ix_authorization_states_expires", "expires_at"),)

    state_hash: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    connection_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("connections.id", ondelete="CASCADE"), nullable=False
        )
    )
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    return_url: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    force: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False))
    # PKCE's code_verifier, sealed (the token request needs it back); the OpenID nonce and the
    # browser-binding cookie only as SHA-256, since they are only ever compared.
    code_verifier: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    nonce_hash: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    browser_binding_hash: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    used_at: datetime | None = _ts()
    created_at: datetime = _now_field()


class HeldGrant(SQLModel, table=True):
    """A grant the callback obtained and holds until the user who started Connect redeems its
    completion ticket (stored only as SHA-256). Unredeemed ones are revoked when they expire.

    No foreign key: a grant held for a connection deleted meanwhile must still be revoked."""

    __tablename__ = "held_grants"
    __table_args__ = (
        sa.Index("ix_held_grants_expires", "expires_at"),
        sa.Index("ix_held_grants_connection", "connection_id"),
    )

    ticket_hash: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    connection_id: uuid.UUID = Field(sa_column=sa.Column(pg.UUID(as_uuid=True), nullable=False))
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    force: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False))
    qb_sub: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    qb_email: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    qb_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    realm_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    company_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    access_token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    refresh_token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    access_token_expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    refresh_token_expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    expires_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False))
    created_at: datetime = _now_field()


class ConnectionEvent(SQLModel, table=True):
    __tablename__ = "connection_events"
    __table_args__ = (sa.Index("ix_connection_events_connection", "connection_id", sa.text("id DESC")),)

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    connection_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("connections.id", ondelete="CASCADE"), nullable=False
        )
    )
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    actor: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    details: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False))
    created_at: datetime = _now_field()


class RefreshAttempt(SQLModel, table=True):
    """A refresh that may have reached Intuit with the connection's refresh token (the one issued
    at `refresh_token_issued_at`), until its outcome is stored (service.tokens.refresh)."""

    __tablename__ = "refresh_attempts"
    __table_args__ = (sa.Index("ix_refresh_attempts_connection", "connection_id"),)

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    connection_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("connections.id", ondelete="CASCADE"), nullable=False
        )
    )
    refresh_token_issued_at: datetime | None = _ts()
    actor: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = _now_field()


class QuickBooksUserClaim(SQLModel, table=True):
    """Which cieTrade user first linked a QuickBooks user, per tenant (the own-credentials rule)."""

    __tablename__ = "quickbooks_user_claims"

    tenant_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    qb_sub: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime = _now_field()


class PendingRevocation(SQLModel, table=True):
    """A token to revoke at Intuit that could not be revoked yet; retried in the background."""

    __tablename__ = "pending_revocations"
    __table_args__ = (sa.Index("ix_pending_revocations_next", "next_attempt_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    connection_id: uuid.UUID = Field(sa_column=sa.Column(pg.UUID(as_uuid=True), nullable=False))
    token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    reason: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    next_attempt_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now()))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = _now_field()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    prefix: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    key_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    scopes: list[str] = Field(sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
    created_at: datetime = _now_field()
    last_used_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


class QuickBooksUsage(SQLModel, table=True):
    """Accounting API calls that reached Intuit, one row per (UTC month, class, tenant, realm),
    incremented in place (service.metering): never a row per call."""

    __tablename__ = "quickbooks_usage"
    __table_args__ = (
        sa.CheckConstraint("call_class IN ('core', 'coreplus')", name="quickbooks_usage_class_check"),
    )

    # The first day of the UTC month. The key's order serves the month's sums (the app's
    # total, a tenant's total) from the primary key's index.
    month: date = Field(sa_column=sa.Column(sa.Date, primary_key=True))
    call_class: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    realm_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    calls: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    updated_at: datetime = _now_field()


class QuickBooksBudget(SQLModel, table=True):
    """A tenant's own monthly CorePlus cap (PUT /tenants/{id}/quickbooks-budget); a tenant
    without a row has BROKER_COREPLUS_TENANT_MONTHLY_CAP."""

    __tablename__ = "quickbooks_budgets"

    tenant_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    coreplus_monthly_cap: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    updated_by: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    updated_at: datetime = _now_field()


class QuickBooksBudgetAlert(SQLModel, table=True):
    """A threshold of the app's CorePlus budget (80, 95, 100 percent) announced for a month: the
    replica whose insert creates the row is the one that logs it."""

    __tablename__ = "quickbooks_budget_alerts"

    month: date = Field(sa_column=sa.Column(sa.Date, primary_key=True))
    threshold: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    coreplus_calls: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    created_at: datetime = _now_field()


class RealmThrottle(SQLModel, table=True):
    """Intuit's per-company limits as the gateway shares them between replicas
    (service.metering.throttle; admission is the function in migration 0005)."""

    __tablename__ = "quickbooks_realm_throttles"
    __table_args__ = {"prefixes": ["UNLOGGED"]}  # ephemeral: see migration 0005

    realm_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    # The newest admissions, oldest first: as many as the largest window limit needs.
    # Compressed with lz4 where the server has it (migration 0011).
    admitted: list[datetime] = Field(
        sa_column=sa.Column(pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'"))
    )
    batch_admitted: list[datetime] = Field(
        sa_column=sa.Column(pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'"))
    )
    # In-flight slots: slot i holds its lease's expiry, or NULL when free.
    leases: list[datetime | None] = Field(
        sa_column=sa.Column(pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'"))
    )
    # Set from Intuit's Retry-After on a 429: nothing is admitted before then.
    paused_until: datetime | None = _ts()
    # When the next call may go, keeping calls an interval apart.
    paced_until: datetime | None = _ts()
