"""Refresh attempts in a table of their own: they are the refresher's bookkeeping (a refresh
token that may have reached Intuit), not a connection's history, which no longer has to filter
them out.

No change notification fires for this table: the caches key on connections, and only the
refresher reads attempts, in its own statements, never through a cache.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refresh_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("connection_id", sa.UUID(), nullable=False),
        sa.Column("refresh_token_issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["connection_id"], ["connections.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_refresh_attempts_connection", "refresh_attempts", ["connection_id"])
    # One statement: the rows deleted are exactly the rows copied, even if a replica still on
    # the code before this revision commits another attempt meanwhile.
    op.execute("""
        WITH moved AS (
            DELETE FROM connection_events WHERE type = 'refresh_attempt'
            RETURNING id, connection_id, details, actor, created_at
        )
        INSERT INTO refresh_attempts (connection_id, refresh_token_issued_at, actor, created_at)
        SELECT connection_id, (details->>'refresh_token_issued_at')::timestamptz, actor, created_at
        FROM moved ORDER BY id
    """)


def downgrade() -> None:
    op.execute("""
        INSERT INTO connection_events (connection_id, tenant_id, type, actor, details, created_at)
        SELECT r.connection_id, c.tenant_id, 'refresh_attempt', r.actor,
               jsonb_build_object('refresh_token_issued_at', r.refresh_token_issued_at), r.created_at
        FROM refresh_attempts r JOIN connections c ON c.id = r.connection_id ORDER BY r.id
    """)
    op.drop_index("ix_refresh_attempts_connection", table_name="refresh_attempts")
    op.drop_table("refresh_attempts")
