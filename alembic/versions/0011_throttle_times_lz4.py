"""The throttle's admission times compressed with lz4 where the server has it.

With the default windows a company's row keeps its 500 newest admission times (4 KB), which
PostgreSQL compresses (pglz) because the row passes 2 KB: every admission decompressed and
compressed them again, about half of what the admission statement cost. lz4 does the same in a
fraction of the time, and the times (close together) still compress to a row small enough to be
updated in place on its page. A server built without lz4 (the embedded one used in development
is) keeps pglz: the migration says so and goes on.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 12:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        DO $$
        BEGIN
            ALTER TABLE quickbooks_realm_throttles
                ALTER COLUMN admitted SET COMPRESSION lz4,
                ALTER COLUMN batch_admitted SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported THEN
            RAISE NOTICE 'PostgreSQL without lz4: the throttle''s admission times stay with pglz';
        END $$
    """)


def downgrade() -> None:
    op.execute(
        "ALTER TABLE quickbooks_realm_throttles "
        "ALTER COLUMN admitted SET COMPRESSION default, "
        "ALTER COLUMN batch_admitted SET COMPRESSION default"
    )
