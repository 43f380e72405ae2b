"""Bind Connect to the browser and user who started it: PKCE, nonce and browser binding on the
authorization state; grants held for a completion ticket.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("authorization_states", sa.Column("code_verifier", sa.Text(), nullable=True))
    op.add_column("authorization_states", sa.Column("nonce_hash", sa.Text(), nullable=True))
    op.add_column("authorization_states", sa.Column("browser_binding_hash", sa.Text(), nullable=True))
    op.create_table(
        "held_grants",
        sa.Column("ticket_hash", sa.Text(), nullable=False),
        sa.Column("connection_id", postgresql.UUID(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("qb_sub", sa.Text(), nullable=False),
        sa.Column("qb_email", sa.Text(), nullable=True),
        sa.Column("qb_name", sa.Text(), nullable=True),
        sa.Column("realm_id", sa.Text(), nullable=False),
        sa.Column("company_name", sa.Text(), nullable=True),
        sa.Column("access_token", sa.Text(), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=False),
        sa.Column("access_token_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refresh_token_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("ticket_hash"),
    )
    op.create_index("ix_held_grants_expires", "held_grants", ["expires_at"])
    op.create_index("ix_held_grants_connection", "held_grants", ["connection_id"])


def downgrade() -> None:
    op.drop_index("ix_held_grants_connection", table_name="held_grants")
    op.drop_index("ix_held_grants_expires", table_name="held_grants")
    op.drop_table("held_grants")
    op.drop_column("authorization_states", "browser_binding_hash")
    op.drop_column("authorization_states", "nonce_hash")
    op.drop_column("authorization_states", "code_verifier")
