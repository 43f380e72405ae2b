"""The events outbox: every change of a connection (and, later, of QuickBooks data) as a public
event, written in the transaction of the change and announced on commit.

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-01 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False, unique=True),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("tenant_id", sa.Text, nullable=False),
        # No foreign key: a connection's events outlive it (connection.deleted among them).
        sa.Column("connection_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("data", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.create_index("ix_events_tenant_seq", "events", ["tenant_id", "seq"])
    op.create_index("ix_events_connection_seq", "events", ["connection_id", "seq"])
    # Delivered on commit only (NOTIFY is transactional), so a listener never hears of an event
    # it cannot read yet, nor of one rolled back. The tenant is left out when it would not fit a
    # notification (listeners then read by seq alone).
    op.execute("""
        CREATE FUNCTION qbo_broker_notify_event() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('qbo_events', json_build_object(
                'seq', NEW.seq,
                'tenant_id', CASE WHEN octet_length(NEW.tenant_id) <= 1000 THEN NEW.tenant_id END,
                'connection_id', NEW.connection_id,
                'type', NEW.type)::text);
            RETURN NULL;
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER events_notify AFTER INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION qbo_broker_notify_event();
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER events_notify ON events")
    op.execute("DROP FUNCTION qbo_broker_notify_event()")
    op.drop_table("events")
