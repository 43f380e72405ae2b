"""The QuickBooks gateway's throttles, shared by every replica: one row per company (realm) and
one function that admits a call in one statement.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "quickbooks_realm_throttles",
        sa.Column("realm_id", sa.Text, primary_key=True),
        sa.Column("admitted", pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("batch_admitted", pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("leases", pg.ARRAY(TZ), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("paused_until", TZ, nullable=True),
        sa.Column("paced_until", TZ, nullable=True),
        # Ephemeral (lost in a crash, empty on a promoted standby: the windows start over): no
        # WAL, so an admission commits without waiting for a disk flush.
        prefixes=["UNLOGGED"],
    )
    # One call per statement: lock the realm's row, read the time after the lock (so admissions
    # are stamped in the order they are made, by one clock for every replica), and either admit
    # (stamp the windows, take a free or lapsed in-flight slot) or say how long to wait. Calls
    # are also spaced `p_interval` apart, so a burst does not reach Intuit as one. Limits of 0
    # are off. `wait_seconds` is what the windows and a pause ask for; `busy`: no free slot.
    op.execute("""
        CREATE FUNCTION qbo_broker_gateway_admit(
            p_realm text, p_batch boolean, p_in_flight int, p_per_second int, p_per_minute int,
            p_batch_per_minute int, p_margin double precision, p_lease double precision,
            p_interval double precision)
        RETURNS TABLE (admitted boolean, slot int, lease timestamptz, wait_seconds double precision,
                       busy boolean)
        LANGUAGE plpgsql AS $$
        DECLARE
            r quickbooks_realm_throttles%ROWTYPE;
            now_ timestamptz;
            second_ interval := make_interval(secs => 1 + p_margin);
            minute_ interval := make_interval(secs => 60 + p_margin);
            wait double precision := 0;
            n int;
            nb int;
            keep int := greatest(p_per_second, p_per_minute, 1);
            free int;
        BEGIN
            SELECT * INTO r FROM quickbooks_realm_throttles t WHERE t.realm_id = p_realm FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO quickbooks_realm_throttles AS t (realm_id) VALUES (p_realm)
                    ON CONFLICT DO NOTHING;
                SELECT * INTO r FROM quickbooks_realm_throttles t WHERE t.realm_id = p_realm
                    FOR UPDATE;
            END IF;
            now_ := clock_timestamp();
            IF r.paused_until IS NOT NULL AND r.paused_until > now_ THEN
                wait := extract(epoch FROM r.paused_until - now_);
            END IF;
            n := cardinality(r.admitted);
            IF p_per_second > 0 AND n >= p_per_second THEN
                wait := greatest(wait, extract(epoch FROM
                    r.admitted[n - p_per_second + 1] + second_ - now_));
            END IF;
            IF p_per_minute > 0 AND n >= p_per_minute THEN
                wait := greatest(wait, extract(epoch FROM
                    r.admitted[n - p_per_minute + 1] + minute_ - now_));
            END IF;
            IF p_interval > 0 AND r.paced_until IS NOT NULL AND r.paced_until > now_ THEN
                wait := greatest(wait, extract(epoch FROM r.paced_until - now_));
            END IF;
            nb := cardinality(r.batch_admitted);
            IF p_batch AND p_batch_per_minute > 0 AND nb >= p_batch_per_minute THEN
                wait := greatest(wait, extract(epoch FROM
                    r.batch_admitted[nb - p_batch_per_minute + 1] + minute_ - now_));
            END IF;
            IF p_in_flight > 0 THEN
                FOR i IN 1..p_in_flight LOOP
                    IF r.leases[i] IS NULL OR r.leases[i] <= now_ THEN
                        free := i;
                        EXIT;
                    END IF;
                END LOOP;
            END IF;
            IF wait > 0 OR (p_in_flight > 0 AND free IS NULL) THEN
                RETURN QUERY SELECT false, NULL::int, NULL::timestamptz, wait,
                                    free IS NULL AND p_in_flight > 0;
                RETURN;
            END IF;
            r.admitted := (r.admitted || now_)[greatest(1, n + 2 - keep) : n + 1];
            IF p_batch THEN
                r.batch_admitted := (r.batch_admitted || now_)
                    [greatest(1, nb + 2 - greatest(p_batch_per_minute, 1)) : nb + 1];
            END IF;
            IF free IS NOT NULL THEN
                r.leases[free] := now_ + make_interval(secs => p_lease);
            END IF;
            IF p_interval > 0 THEN
                -- The pace is kept on schedule: a call admitted a little late (a busy replica)
                -- does not push every later one back, down to half an interval after it.
                r.paced_until := greatest(coalesce(r.paced_until, now_)
                                          + make_interval(secs => p_interval),
                                          now_ + make_interval(secs => p_interval / 2));
            END IF;
            UPDATE quickbooks_realm_throttles t
               SET admitted = r.admitted, batch_admitted = r.batch_admitted, leases = r.leases,
                   paced_until = r.paced_until
             WHERE t.realm_id = p_realm;
            RETURN QUERY SELECT true, free, r.leases[free], 0::double precision, false;
        END $$;
    """)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION qbo_broker_gateway_admit(text, boolean, int, int, int, int, "
        "double precision, double precision, double precision)"
    )
    op.drop_table("quickbooks_realm_throttles")
