"""Notify every replica of changed connections and API keys (for its read caches).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 05:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION qbo_broker_notify_connection() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            changed connections;
        BEGIN
            changed := COALESCE(NEW, OLD);
            PERFORM pg_notify('qbo_broker_connections',
                              json_build_object('id', changed.id, 'tenant_id', changed.tenant_id)::text);
            IF TG_OP = 'UPDATE' AND NEW.tenant_id IS DISTINCT FROM OLD.tenant_id THEN
                PERFORM pg_notify('qbo_broker_connections',
                                  json_build_object('id', OLD.id, 'tenant_id', OLD.tenant_id)::text);
            END IF;
            RETURN NULL;
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER connections_notify AFTER INSERT OR UPDATE OR DELETE ON connections
        FOR EACH ROW EXECUTE FUNCTION qbo_broker_notify_connection();
    """)
    op.execute("""
        CREATE FUNCTION qbo_broker_notify_api_key() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('qbo_broker_api_keys', '');
            RETURN NULL;
        END $$;
    """)
    op.execute("""
        CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
        FOR EACH STATEMENT EXECUTE FUNCTION qbo_broker_notify_api_key();
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("DROP FUNCTION qbo_broker_notify_api_key()")
    op.execute("DROP TRIGGER connections_notify ON connections")
    op.execute("DROP FUNCTION qbo_broker_notify_connection()")
