"""The tables of Intuit's webhooks: notifications as received, and the entity changes seen."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel

TZ = sa.DateTime(timezone=True)


class IntuitNotification(SQLModel, table=True):
    """One signed POST from Intuit, its body byte for byte; processed after it was answered."""

    __tablename__ = "intuit_notifications"
    __table_args__ = (
        # What the processor claims; stays small, since rows leave it once processed.
        sa.Index(
            "ix_intuit_notifications_unprocessed", "id", postgresql_where=sa.text("processed_at IS NULL")
        ),
        sa.Index(
            "ix_intuit_notifications_processed",
            "processed_at",
            postgresql_where=sa.text("processed_at IS NOT NULL"),
        ),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    received_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now()),
    )
    body: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))
    processed_at: datetime | None = Field(default=None, sa_column=sa.Column(TZ))
    # Failed processing attempts; a notification that keeps failing is set aside (last_error).
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    # What processing found, by outcome (emitted, duplicate, unknown_realm, ...).
    outcomes: dict[str, int] | None = Field(default=None, sa_column=sa.Column(pg.JSONB))


class IntuitEntityChange(SQLModel, table=True):
    """Every entity change seen, once: the key that drops Intuit's retries, the same change in
    the other format, and replays (README, "Intuit webhooks"). Kept for DEDUPE_WINDOW."""

    __tablename__ = "intuit_entity_changes"
    __table_args__ = (sa.Index("ix_intuit_entity_changes_second", "occurred_second"),)

    realm_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    entity: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    entity_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    operation: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    # The change's time cut to the second: the formats do not carry it to the same precision.
    occurred_second: datetime = Field(sa_column=sa.Column(TZ, primary_key=True))
    notification_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    outcome: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    recorded_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        sa_column=sa.Column(TZ, nullable=False, server_default=sa.func.now()),
    )
