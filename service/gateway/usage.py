"""HTTP endpoints of metering: the month's Accounting API calls (GET /usage) and a tenant's
monthly CorePlus cap (PUT /tenants/{tenant_id}/quickbooks-budget)."""

from __future__ import annotations

import logging
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.auth.callers import Scope
from service.auth.dependencies import CurrentCaller
from service.connections.schemas import TenantId
from service.core.errors import problem_responses
from service.metering import repository as repo
from service.runtime import RuntimeDep

router = APIRouter(tags=["usage"])
log = logging.getLogger(__name__)

ERRORS = problem_responses(401, 403, 404, 422, 503)
MAX_CAP = 10**9

Month = Annotated[
    str | None,
    Query(
        pattern=r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$",
        description="The UTC month, `YYYY-MM`; the current one when left out.",
    ),
]
TenantQuery = Annotated[
    TenantId | None,
    Query(
        description="Services: one tenant (else every tenant with calls or a cap of its own). "
        "Users: their own tenant only."
    ),
]
TenantPath = Annotated[TenantId, Path(description="The cieTrade tenant.")]


class AppUsageOut(BaseModel):
    core: int = Field(description="Core calls (writes) of every tenant this month.")
    coreplus: int = Field(description="CorePlus calls (reads) of every tenant this month.")
    coreplus_budget: int = Field(description="BROKER_COREPLUS_MONTHLY_BUDGET.")
    coreplus_remaining: int = Field(description="What is left of the budget (never below 0).")


class TenantUsageOut(BaseModel):
    tenant_id: str
    core: int
    coreplus: int
    coreplus_cap: int | None = Field(
        description="The tenant's monthly CorePlus cap (its own, else the default); null: none."
    )


class UsageOut(BaseModel):
    month: str = Field(examples=["2026-12"])
    app: AppUsageOut
    tenants: list[TenantUsageOut]


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coreplus_monthly_cap: int | None = Field(
        ge=0,
        le=MAX_CAP,
        description="CorePlus calls the tenant may make per UTC month; null: the default "
        "(BROKER_COREPLUS_TENANT_MONTHLY_CAP) applies again.",
    )

    @field_validator("coreplus_monthly_cap", mode="before")
    @classmethod
    def _a_json_integer(cls, value: object) -> object:
        # JSON's integers (2 and 2.0 alike), not what Python would turn into one (false, "3").
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError("must be a whole number of calls or null")


class BudgetOut(BaseModel):
    tenant_id: str
    coreplus_monthly_cap: int | None = Field(description="The tenant's own cap, null if none.")
    coreplus_cap: int | None = Field(description="The cap in force: its own, else the default.")


@router.get(
    "/usage",
    response_model=UsageOut,
    responses=ERRORS,
    summary="Accounting API calls by class, for the app and per tenant",
    description="Counts of the requests that reached Intuit in a UTC month (retries "
    "included), at most about a second behind. Services need `status:read` "
    "and may leave out `tenant_id`; a user sees their own tenant.",
)
async def usage(
    rt: RuntimeDep, caller: CurrentCaller, month: Month = None, tenant_id: TenantQuery = None
) -> UsageOut:
    tenant: str | None
    if caller.is_user:
        tenant = caller.tenant_for_read(tenant_id)  # their own; another tenant is 404
    else:
        caller.require_scope(Scope.STATUS_READ)
        tenant = tenant_id
    first = date(int(month[:4]), int(month[5:]), 1) if month else rt.meter.current_month()
    async with rt.pool.acquire() as conn:
        totals = await repo.app_totals(conn, first)
        tenants = await repo.tenant_usage(conn, first, tenant)
    budget = rt.meter.budget
    return UsageOut(
        month=f"{first:%Y-%m}",
        app=AppUsageOut(
            core=totals["core"],
            coreplus=totals["coreplus"],
            coreplus_budget=budget,
            coreplus_remaining=max(0, budget - totals["coreplus"]),
        ),
        tenants=[
            TenantUsageOut(
                tenant_id=t.tenant_id,
                core=t.core,
                coreplus=t.coreplus,
                coreplus_cap=t.cap if t.cap is not None else rt.meter.default_cap,
            )
            for t in tenants
        ],
    )


@router.put(
    "/tenants/{tenant_id}/quickbooks-budget",
    response_model=BudgetOut,
    responses={**ERRORS, **problem_responses(400)},
    summary="Set a tenant's monthly CorePlus cap",
    description="Services with `connections:write` only: the cap protects the app's "
    "budget from a tenant, so a tenant's own users cannot raise it. Takes "
    "effect on every replica within about a second.",
)
async def set_budget(
    rt: RuntimeDep, caller: CurrentCaller, tenant_id: TenantPath, body: BudgetIn
) -> BudgetOut:
    caller.require_scope(Scope.CONNECTIONS_WRITE)
    async with rt.pool.acquire() as conn:
        await repo.set_cap(conn, tenant_id, body.coreplus_monthly_cap, caller.actor)
    rt.meter.forget(tenant_id)
    log.info(
        "quickbooks budget: tenant %s cap set to %s by %s", tenant_id, body.coreplus_monthly_cap, caller.actor
    )
    cap = body.coreplus_monthly_cap
    return BudgetOut(
        tenant_id=tenant_id,
        coreplus_monthly_cap=cap,
        coreplus_cap=cap if cap is not None else rt.meter.default_cap,
    )
