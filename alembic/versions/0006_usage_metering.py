"""Metering of Accounting API calls: counts per UTC month, class, tenant and realm; per-tenant
CorePlus caps; the budget thresholds announced per month.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quickbooks_usage",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("call_class", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("realm_id", sa.Text(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("call_class IN ('core', 'coreplus')", name="quickbooks_usage_class_check"),
        sa.PrimaryKeyConstraint("month", "call_class", "tenant_id", "realm_id"),
    )
    op.create_table(
        "quickbooks_budgets",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("coreplus_monthly_cap", sa.BigInteger(), nullable=False),
        sa.Column("updated_by", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "quickbooks_budget_alerts",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("coreplus_calls", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("month", "threshold"),
    )


def downgrade() -> None:
    op.drop_table("quickbooks_budget_alerts")
    op.drop_table("quickbooks_budgets")
    op.drop_table("quickbooks_usage")
