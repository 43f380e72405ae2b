"""Every SQL statement on the metering tables (quickbooks_usage, quickbooks_budgets,
quickbooks_budget_alerts): single statements on a plain asyncpg connection, autocommitted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg


@dataclass(frozen=True)
class TenantFigures:
    tenant_id: str
    cap: int | None  # the tenant's own cap; None: the default applies
    coreplus: int


@dataclass(frozen=True)
class TenantUsage:
    tenant_id: str
    core: int
    coreplus: int
    cap: int | None


async def add_calls(
    conn: asyncpg.Connection, counts: Sequence[tuple[tuple[date, str, str, str], int]]
) -> None:
    """Add counts keyed (month, class, tenant, realm): one statement whatever their number.
    Rows are locked in key order, so replicas flushing overlapping keys cannot deadlock."""
    months, classes, tenants, realms, calls = [], [], [], [], []
    for (month, call_class, tenant_id, realm_id), n in counts:
        months.append(month)
        classes.append(call_class)
        tenants.append(tenant_id)
        realms.append(realm_id)
        calls.append(n)
    await conn.execute(
        """
        INSERT INTO quickbooks_usage AS u (month, call_class, tenant_id, realm_id, calls)
        SELECT m, c, t, r, n
        FROM unnest($1::date[], $2::text[], $3::text[], $4::text[], $5::bigint[]) AS b(m, c, t, r, n)
        ORDER BY m, c, t, r
        ON CONFLICT (month, call_class, tenant_id, realm_id)
        DO UPDATE SET calls = u.calls + excluded.calls, updated_at = now()
    """,
        months,
        classes,
        tenants,
        realms,
        calls,
    )


async def tenant_figures(conn: asyncpg.Connection, tenant_ids: list[str], month: date) -> list[TenantFigures]:
    """Each tenant's own cap and its CorePlus calls in the month, in the order asked."""
    rows = await conn.fetch(
        """
        SELECT t.tenant_id, b.coreplus_monthly_cap AS cap,
               coalesce((SELECT sum(u.calls) FROM quickbooks_usage u
                         WHERE u.month = $2 AND u.call_class = 'coreplus'
                           AND u.tenant_id = t.tenant_id), 0)::bigint AS coreplus
        FROM unnest($1::text[]) WITH ORDINALITY AS t(tenant_id, i)
        LEFT JOIN quickbooks_budgets b ON b.tenant_id = t.tenant_id
        ORDER BY t.i
    """,
        tenant_ids,
        month,
    )
    return [TenantFigures(row["tenant_id"], row["cap"], row["coreplus"]) for row in rows]


async def app_coreplus(conn: asyncpg.Connection, month: date) -> int:
    value = await conn.fetchval(
        """
        SELECT coalesce(sum(calls), 0)::bigint FROM quickbooks_usage
        WHERE month = $1 AND call_class = 'coreplus'
    """,
        month,
    )
    return int(value)


# The tenant id of an event about the whole app (a tenant id never has a `*`): webhook endpoints
# without a tenant filter receive it; no tenant's stream carries it.
APP_TENANT = "*"


async def claim_thresholds(
    conn: asyncpg.Connection, month: date, thresholds: list[int], coreplus: int, budget: int
) -> list[int]:
    """The thresholds this call recorded first for the month (no other replica had), each
    published as a `quickbooks.usage_threshold` event in the same statement (service.events)."""
    rows = await conn.fetch(
        """
        WITH claimed AS (
            INSERT INTO quickbooks_budget_alerts (month, threshold, coreplus_calls)
            SELECT $1, t, $3 FROM unnest($2::int[]) AS t
            ON CONFLICT (month, threshold) DO NOTHING
            RETURNING threshold),
        published AS (
            INSERT INTO events (id, type, tenant_id, connection_id, data)
            SELECT gen_random_uuid(), 'quickbooks.usage_threshold', $5, NULL,
                   jsonb_build_object('month', to_char($1::date, 'YYYY-MM'),
                                      'threshold_percent', threshold,
                                      'coreplus_calls', $3::bigint,
                                      'coreplus_budget', $4::bigint)
            FROM claimed)
        SELECT threshold FROM claimed
    """,
        month,
        thresholds,
        coreplus,
        budget,
        APP_TENANT,
    )
    return sorted(row["threshold"] for row in rows)


async def app_totals(conn: asyncpg.Connection, month: date) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT call_class, sum(calls)::bigint AS calls FROM quickbooks_usage
        WHERE month = $1 GROUP BY call_class
    """,
        month,
    )
    totals = {"core": 0, "coreplus": 0}
    totals.update({row["call_class"]: row["calls"] for row in rows})
    return totals


async def tenant_usage(conn: asyncpg.Connection, month: date, tenant_id: str | None) -> list[TenantUsage]:
    """Per tenant, the month's calls by class and its own cap: one tenant (listed even without
    calls), or every tenant with calls in the month or a cap of its own."""
    rows = await conn.fetch(
        """
        WITH tenants AS (
            SELECT $2::text AS tenant_id WHERE $2::text IS NOT NULL
            UNION
            SELECT tenant_id FROM quickbooks_usage WHERE $2::text IS NULL AND month = $1
            UNION
            SELECT tenant_id FROM quickbooks_budgets WHERE $2::text IS NULL
        )
        SELECT t.tenant_id, b.coreplus_monthly_cap AS cap,
               coalesce(sum(u.calls) FILTER (WHERE u.call_class = 'core'), 0)::bigint AS core,
               coalesce(sum(u.calls) FILTER (WHERE u.call_class = 'coreplus'), 0)::bigint
                   AS coreplus
        FROM tenants t
        LEFT JOIN quickbooks_usage u ON u.month = $1 AND u.tenant_id = t.tenant_id
        LEFT JOIN quickbooks_budgets b ON b.tenant_id = t.tenant_id
        GROUP BY t.tenant_id, b.coreplus_monthly_cap
        ORDER BY t.tenant_id
    """,
        month,
        tenant_id,
    )
    return [TenantUsage(row["tenant_id"], row["core"], row["coreplus"], row["cap"]) for row in rows]


async def set_cap(conn: asyncpg.Connection, tenant_id: str, cap: int | None, actor: str) -> None:
    """The tenant's own cap; None removes it (the default applies again)."""
    if cap is None:
        await conn.execute("DELETE FROM quickbooks_budgets WHERE tenant_id = $1", tenant_id)
        return
    await conn.execute(
        """
        INSERT INTO quickbooks_budgets (tenant_id, coreplus_monthly_cap, updated_by)
        VALUES ($1, $2, $3)
        ON CONFLICT (tenant_id) DO UPDATE
        SET coreplus_monthly_cap = excluded.coreplus_monthly_cap,
            updated_by = excluded.updated_by, updated_at = now()
    """,
        tenant_id,
        cap,
        actor,
    )
