"""Intuit's webhooks in: notifications as received, and the entity changes seen, for dropping
duplicates.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "intuit_notifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcomes", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_intuit_notifications_unprocessed",
        "intuit_notifications",
        ["id"],
        postgresql_where=sa.text("processed_at IS NULL"),
    )
    op.create_index(
        "ix_intuit_notifications_processed",
        "intuit_notifications",
        ["processed_at"],
        postgresql_where=sa.text("processed_at IS NOT NULL"),
    )
    op.create_table(
        "intuit_entity_changes",
        sa.Column("realm_id", sa.Text(), nullable=False),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("occurred_second", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("realm_id", "entity", "entity_id", "operation", "occurred_second"),
    )
    op.create_index("ix_intuit_entity_changes_second", "intuit_entity_changes", ["occurred_second"])


def downgrade() -> None:
    op.drop_index("ix_intuit_entity_changes_second", table_name="intuit_entity_changes")
    op.drop_table("intuit_entity_changes")
    op.drop_index("ix_intuit_notifications_processed", table_name="intuit_notifications")
    op.drop_index("ix_intuit_notifications_unprocessed", table_name="intuit_notifications")
    op.drop_table("intuit_notifications")
