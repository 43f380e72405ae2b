"""The gateway's throttle gives slots back in the statement that admits the next call.

A call's in-flight slot used to be given back by a statement of its own, so every call through
the gateway cost PostgreSQL two statements on the realm's row. Now a replica keeps the slots it
has finished with for a moment and hands them to its next admission of that realm, which frees
them under the same row lock before it looks for room; slots that no admission picks up soon are
given back together by one statement. The admitting function of 0005 stays, for replicas still
running the code before this revision during a rolling deploy.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 03:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frees each slot in p_slots whose lease is still the one given in p_leases (a slot that lapsed
# and was taken again belongs to another call by now). Used inside the functions below.
_FREE = """
            FOR i IN 1..coalesce(cardinality(p_slots), 0) LOOP
                IF r.leases[p_slots[i]] = p_leases[i] THEN
                    r.leases[p_slots[i]] := NULL;
                    freed := freed + 1;
                END IF;
            END LOOP;
"""


def upgrade() -> None:
    # 0005's qbo_broker_gateway_admit, with the slots to give back first (p_slots, p_leases).
    op.execute(f"""
        CREATE FUNCTION qbo_broker_gateway_admit(
            p_realm text, p_batch boolean, p_in_flight int, p_per_second int, p_per_minute int,
            p_batch_per_minute int, p_margin double precision, p_lease double precision,
            p_interval double precision, p_slots int[], p_leases timestamptz[])
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
            freed int := 0;
        BEGIN
            SELECT * INTO r FROM quickbooks_realm_throttles t WHERE t.realm_id = p_realm FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO quickbooks_realm_throttles AS t (realm_id) VALUES (p_realm)
                    ON CONFLICT DO NOTHING;
                SELECT * INTO r FROM quickbooks_realm_throttles t WHERE t.realm_id = p_realm
                    FOR UPDATE;
            END IF;
{_FREE}
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
                IF freed > 0 THEN
                    UPDATE quickbooks_realm_throttles t SET leases = r.leases
                     WHERE t.realm_id = p_realm;
                END IF;
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
    """)  # noqa: S608 (a constant fragment, no input)
    # The slots no admission picked up, given back together; answers how many were still held.
    op.execute(f"""
        CREATE FUNCTION qbo_broker_gateway_release(p_realm text, p_slots int[], p_leases timestamptz[])
        RETURNS int
        LANGUAGE plpgsql AS $$
        DECLARE
            r quickbooks_realm_throttles%ROWTYPE;
            freed int := 0;
        BEGIN
            SELECT * INTO r FROM quickbooks_realm_throttles t WHERE t.realm_id = p_realm FOR UPDATE;
            IF NOT FOUND THEN
                RETURN 0;
            END IF;
{_FREE}
            IF freed > 0 THEN
                UPDATE quickbooks_realm_throttles t SET leases = r.leases WHERE t.realm_id = p_realm;
            END IF;
            RETURN freed;
        END $$;
    """)  # noqa: S608 (a constant fragment, no input)


def downgrade() -> None:
    op.execute("DROP FUNCTION qbo_broker_gateway_release(text, int[], timestamptz[])")
    op.execute(
        "DROP FUNCTION qbo_broker_gateway_admit(text, boolean, int, int, int, int, "
        "double precision, double precision, double precision, int[], timestamptz[])"
    )
