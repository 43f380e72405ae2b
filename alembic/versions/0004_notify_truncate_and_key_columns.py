"""Change notifications: a TRUNCATE drops every replica's caches; API-key notifications only for
the columns a cached caller is built from (not `last_used_at`, touched on use).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Row triggers do not fire on TRUNCATE: without this, replicas kept serving emptied tables.
    op.execute("""
        CREATE FUNCTION qbo_broker_notify_connections_truncated() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('qbo_broker_connections', '{"all": true}');
            RETURN NULL;
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER connections_notify_truncate AFTER TRUNCATE ON connections
        FOR EACH STATEMENT EXECUTE FUNCTION qbo_broker_notify_connections_truncated();
    """)
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("""
        CREATE TRIGGER api_keys_notify
        AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF key_hash, name, prefix, scopes, revoked_at
        ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION qbo_broker_notify_api_key();
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("""
        CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
        FOR EACH STATEMENT EXECUTE FUNCTION qbo_broker_notify_api_key();
    """)
    op.execute("DROP TRIGGER connections_notify_truncate ON connections")
    op.execute("DROP FUNCTION qbo_broker_notify_connections_truncated()")
