"""The events tables."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel

TZ = sa.DateTime(timezone=True)


def _now() -> datetime:
    return datetime.now(UTC)


class Event(SQLModel, table=True):
    """One public event. `id` is its public id; `seq` orders events as they were written."""

    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_tenant_seq", "tenant_id", "seq"),
        sa.Index("ix_events_connection_seq", "connection_id", "seq"),
    )

    id: uuid.UUID = Field(primary_key=True)
    seq: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger, sa.Identity(always=True), nullable=False, unique=True),
    )
    type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now()))
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    connection_id: uuid.UUID | None = Field(default=None, sa_column=sa.Column(pg.UUID(as_uuid=True)))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False))


class WebhookEndpoint(SQLModel, table=True):
    """A receiver of events. Its signing secrets are stored sealed (service.core.crypto)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (sa.Index("ix_webhook_endpoints_tenant", "tenant_id"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    url: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    tenant_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    event_types: list[str] | None = Field(default=None, sa_column=sa.Column(pg.ARRAY(sa.Text)))
    secret: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    previous_secret: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    previous_secret_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    disabled_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    disabled_reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_by: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = Field(
        default_factory=_now, sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now())
    )
    updated_at: datetime = Field(
        default_factory=_now, sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now())
    )


class WebhookDelivery(SQLModel, table=True):
    """One event for one endpoint: pending (due at next_attempt_at; being sent while its lease
    runs), then succeeded, failed (attempts spent, or the endpoint answered 410) or cancelled
    (its endpoint was disabled)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed', 'cancelled')",
            name="webhook_deliveries_status_check",
        ),
        sa.Index(
            "ix_webhook_deliveries_due",
            "endpoint_id",
            "next_attempt_at",
            postgresql_where=sa.text("status = 'pending'"),
        ),
        sa.Index(
            "ix_webhook_deliveries_endpoint", "endpoint_id", sa.text("created_at DESC"), sa.text("id DESC")
        ),
        sa.Index("ix_webhook_deliveries_event", "event_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    endpoint_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
        )
    )
    event_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False
        )
    )
    status: str = Field(
        default="pending", sa_column=sa.Column(sa.Text, nullable=False, server_default="pending")
    )
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    next_attempt_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    lease_token: uuid.UUID | None = Field(default=None, sa_column=sa.Column(pg.UUID(as_uuid=True)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    last_attempt_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    last_status_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    last_duration_ms: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    delivered_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    created_at: datetime = Field(
        default_factory=_now, sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now())
    )
