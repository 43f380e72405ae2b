"""Outgoing webhooks: endpoints, and one delivery per event and endpoint, made when the event is
written (so a delivery is exactly as durable as its event).

Revision ID: 0007b
Revises: 0007
Create Date: 2026-12-01 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import op

revision: str = "0007b"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("tenant_id", sa.Text, nullable=True),
        sa.Column("event_types", pg.ARRAY(sa.Text), nullable=True),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("previous_secret", sa.Text, nullable=True),
        sa.Column("previous_secret_expires_at", TZ, nullable=True),
        sa.Column("disabled_at", TZ, nullable=True),
        sa.Column("disabled_reason", sa.Text, nullable=True),
        sa.Column("created_by", sa.Text, nullable=True),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_webhook_endpoints_tenant", "webhook_endpoints", ["tenant_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "endpoint_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "event_id", pg.UUID(as_uuid=True), sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TZ, nullable=True),
        sa.Column("lease_token", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("lease_expires_at", TZ, nullable=True),
        sa.Column("last_attempt_at", TZ, nullable=True),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("last_duration_ms", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed', 'cancelled')",
            name="webhook_deliveries_status_check",
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["endpoint_id", "next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint",
        "webhook_deliveries",
        ["endpoint_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_index("ix_webhook_deliveries_event", "webhook_deliveries", ["event_id"])
    # Fan-out in the event's own transaction: a committed event has its deliveries, a rolled-back
    # one none. Endpoints are few; this is an index-free scan of a small table.
    op.execute("""
        CREATE FUNCTION qbo_broker_fan_out_event() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO webhook_deliveries (id, endpoint_id, event_id, next_attempt_at)
            SELECT gen_random_uuid(), e.id, NEW.id, now()
            FROM webhook_endpoints e
            WHERE e.disabled_at IS NULL
              AND (e.tenant_id IS NULL OR e.tenant_id = NEW.tenant_id)
              AND (e.event_types IS NULL OR NEW.type = ANY (e.event_types));
            RETURN NULL;
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER events_fan_out AFTER INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION qbo_broker_fan_out_event();
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER events_fan_out ON events")
    op.execute("DROP FUNCTION qbo_broker_fan_out_event()")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
