"""The throttle's admission times compressed with lz4 where the server has it.

With the default windows a company's row keeps its 500 newest admission times (4 KB), which
PostgreSQL compresses because the row passes 2 KB: every admission decompressed the array and
compressed it again, with pglz about half of what the admission statement cost. lz4 does the
same work in a fraction of the time (the array still goes to the TOAST table either way; the
gain is CPU). A server built without lz4 (the embedded one used in development) keeps pglz:
the migration logs a warning and goes on.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 12:40:00
"""

import logging
from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    methods = (
        op.get_bind()
        .exec_driver_sql("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
        .scalar()
    )
    if "lz4" not in (methods or []):
        log.warning("PostgreSQL built without lz4: the throttle's admission times stay with pglz")
        return
    op.execute(
        "ALTER TABLE quickbooks_realm_throttles "
        "ALTER COLUMN admitted SET COMPRESSION lz4, "
        "ALTER COLUMN batch_admitted SET COMPRESSION lz4"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE quickbooks_realm_throttles "
        "ALTER COLUMN admitted SET COMPRESSION default, "
        "ALTER COLUMN batch_admitted SET COMPRESSION default"
    )
