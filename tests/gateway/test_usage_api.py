"""GET /usage and PUT /tenants/{id}/quickbooks-budget over real HTTP: the contract's shape, who
may call them, tenant isolation, validation; the broker's own CompanyInfo read counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest

from service.core.config import Settings
from service.core.db.engine import create_asyncpg_pool
from service.metering.meter import Meter, QuickBooksBudgetExhausted, month_of
from tests.conftest import COMPANY_1, TENANT, user_headers
from tests.support.db_helpers import execute
from tests.support.waiting import until

# A month the suite's own gateway calls are never counted in (they count in the current one,
# and a broker flushes its counts after a test has ended).
DEC = date(2025, 12, 1)


async def add_usage(
    database_url: str, month: date, call_class: str, tenant: str, realm: str, calls: int
) -> None:
    await execute(
        database_url,
        "INSERT INTO quickbooks_usage (month, call_class, tenant_id, "
        "realm_id, calls) VALUES ($1, $2, $3, $4, $5)",
        month,
        call_class,
        tenant,
        realm,
        calls,
    )


@pytest.fixture
async def figures(stack) -> None:
    url = stack.database_url
    await add_usage(url, DEC, "core", "tenant-a", "r1", 5)
    await add_usage(url, DEC, "coreplus", "tenant-a", "r1", 7)
    await add_usage(url, DEC, "coreplus", "tenant-a", "r2", 3)
    await add_usage(url, DEC, "coreplus", "tenant-b", "r3", 11)
    await add_usage(url, date(2025, 11, 1), "coreplus", "tenant-a", "r1", 1000)


async def test_usage_for_the_app_and_every_tenant(client, service_headers, figures) -> None:
    headers = await service_headers("status:read")
    response = await client.get("/usage", params={"month": "2025-12"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "month": "2025-12",
        "app": {"core": 5, "coreplus": 21, "coreplus_budget": 500000, "coreplus_remaining": 500000 - 21},
        "tenants": [
            {"tenant_id": "tenant-a", "core": 5, "coreplus": 10, "coreplus_cap": None},
            {"tenant_id": "tenant-b", "core": 0, "coreplus": 11, "coreplus_cap": None},
        ],
    }
    november = (await client.get("/usage", params={"month": "2025-11"}, headers=headers)).json()
    assert november["app"]["coreplus"] == 1000
    assert [t["tenant_id"] for t in november["tenants"]] == ["tenant-a"]


async def test_one_tenant_and_the_current_month(client, service_headers, figures) -> None:
    headers = await service_headers("status:read")
    one = (
        await client.get("/usage", params={"month": "2025-12", "tenant_id": "tenant-b"}, headers=headers)
    ).json()
    assert one["tenants"] == [{"tenant_id": "tenant-b", "core": 0, "coreplus": 11, "coreplus_cap": None}]
    assert one["app"]["coreplus"] == 21  # the app's figures stay the app's
    # A tenant without calls is listed, with zeros.
    none = (
        await client.get("/usage", params={"month": "2025-12", "tenant_id": "tenant-z"}, headers=headers)
    ).json()
    assert none["tenants"] == [{"tenant_id": "tenant-z", "core": 0, "coreplus": 0, "coreplus_cap": None}]
    current = month_of(datetime.now(UTC))
    default = (await client.get("/usage", headers=headers)).json()
    assert default["month"] == f"{current:%Y-%m}"
    named = (await client.get("/usage", params={"month": f"{current:%Y-%m}"}, headers=headers)).json()
    assert default == named


async def test_a_user_sees_their_own_tenant_only(client, figures) -> None:
    own = await client.get("/usage", params={"month": "2025-12"}, headers=user_headers("tenant-a"))
    assert own.status_code == 200, own.text
    assert [t["tenant_id"] for t in own.json()["tenants"]] == ["tenant-a"]
    named = await client.get(
        "/usage", params={"month": "2025-12", "tenant_id": "tenant-a"}, headers=user_headers("tenant-a")
    )
    assert named.json() == own.json()
    other = await client.get(
        "/usage", params={"month": "2025-12", "tenant_id": "tenant-b"}, headers=user_headers("tenant-a")
    )
    assert other.status_code == 404
    assert other.json()["code"] == "not_found"
    assert "tenant-b" not in other.text


@pytest.mark.parametrize("scopes", [("tokens:read",), ("connections:write",)])
async def test_services_need_status_read(client, service_headers, scopes) -> None:
    response = await client.get("/usage", headers=await service_headers(*scopes))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "forbidden"


async def test_usage_needs_a_caller(client) -> None:
    response = await client.get("/usage")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


@pytest.mark.parametrize(
    "month",
    ["2026-13", "2026-00", "2026-1", "26-12", "0999-01", "2026-12-01", "abcd-ef", "", "2026-12\n", "२०२६-१२"],
)
async def test_a_bad_month_is_a_validation_problem(client, service_headers, month) -> None:
    response = await client.get(
        "/usage", params={"month": month}, headers=await service_headers("status:read")
    )
    assert response.status_code == 422, (month, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "validation_error"


async def test_a_bad_tenant_id_is_a_validation_problem(client, service_headers) -> None:
    response = await client.get(
        "/usage", params={"tenant_id": "x" * 129}, headers=await service_headers("status:read")
    )
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


# -- caps ------------------------------------------------------------------------------------


async def put_cap(
    client: httpx.AsyncClient, tenant: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    return await client.put(f"/tenants/{tenant}/quickbooks-budget", json=body, headers=headers)


@pytest.fixture
async def meter_on(stack) -> AsyncIterator[Any]:
    """A Meter as another replica has it, on the test database."""
    made: list[tuple[Meter, Any]] = []

    async def make(settings: Settings) -> Meter:
        pool = await create_asyncpg_pool(stack.database_url, max_size=2)
        meter = Meter(pool, settings, flush_interval=3600)
        made.append((meter, pool))
        return meter

    yield make
    for meter, pool in made:
        await meter.aclose()
        await pool.close()


async def test_a_service_sets_and_clears_a_tenants_cap(client, service_headers, stack, meter_on) -> None:
    writer = await service_headers("connections:write")
    reader = await service_headers("status:read")
    response = await put_cap(client, "tenant-a", {"coreplus_monthly_cap": 2.0}, writer)
    assert response.status_code == 200, response.text
    assert response.json() == {"tenant_id": "tenant-a", "coreplus_monthly_cap": 2, "coreplus_cap": 2}
    listed = (await client.get("/usage", headers=reader)).json()["tenants"]
    assert {"tenant_id": "tenant-a", "core": 0, "coreplus": 0, "coreplus_cap": 2} in listed

    # Every replica enforces it.
    meter = await meter_on(stack.settings)
    await meter.admit("tenant-a", "r1", "coreplus")
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    await meter.record("tenant-a", "r1", "coreplus", "ok")
    with pytest.raises(QuickBooksBudgetExhausted):
        await meter.admit("tenant-a", "r1", "coreplus")
    await meter.admit("tenant-a", "r1", "core")

    cleared = await put_cap(client, "tenant-a", {"coreplus_monthly_cap": None}, writer)
    assert cleared.json() == {"tenant_id": "tenant-a", "coreplus_monthly_cap": None, "coreplus_cap": None}
    await meter.flush()  # the replica reads the tenant's figures again
    await meter.admit("tenant-a", "r1", "coreplus")


async def test_without_its_own_cap_a_tenant_has_the_default(stack, meter_on) -> None:
    from service.main import create_app
    from tests.conftest import broker_settings
    from tests.support.servers import ThreadedServer, free_port

    port = free_port()
    settings = broker_settings(
        stack.database_url,
        port,
        stack.emulator_url,
        BROKER_COREPLUS_TENANT_MONTHLY_CAP=1,
        BROKER_COREPLUS_MONTHLY_BUDGET=1000,
    )
    broker = ThreadedServer(create_app(settings), port).start()
    try:
        async with httpx.AsyncClient(base_url=broker.url) as http:
            body = (await http.get("/usage", params={"tenant_id": TENANT}, headers=user_headers())).json()
            assert body["app"]["coreplus_budget"] == 1000
            assert body["tenants"][0]["coreplus_cap"] == 1
            own = await http.put(
                f"/tenants/{TENANT}/quickbooks-budget",
                json={"coreplus_monthly_cap": 5},
                headers=user_headers(),
            )
            assert own.status_code == 403  # a tenant's users cannot raise their own cap
    finally:
        broker.stop()
    meter = await meter_on(settings)
    await meter.admit(TENANT, "r1", "coreplus")
    await meter.record(TENANT, "r1", "coreplus", "ok")
    with pytest.raises(QuickBooksBudgetExhausted):
        await meter.admit(TENANT, "r1", "coreplus")


@pytest.mark.parametrize(
    "body",
    [
        {"coreplus_monthly_cap": -1},
        {"coreplus_monthly_cap": 10**9 + 1},
        {"coreplus_monthly_cap": "many"},
        {"coreplus_monthly_cap": 1.5},
        {},
        {"coreplus_monthly_cap": False},
        {"coreplus_monthly_cap": "3"},
        {"coreplus_monthly_cap": 1e30},
        {"coreplus_monthly_cap": 1, "coreplus_monthly_budget": 2},
        [],
        "5",
        {"coreplus_monthly_cap": 10**30},
    ],
)
async def test_a_bad_cap_is_a_validation_problem(client, service_headers, body) -> None:
    response = await put_cap(client, "tenant-a", body, await service_headers("connections:write"))
    assert response.status_code == 422, (body, response.text)
    assert response.json()["code"] == "validation_error"


async def test_who_may_set_a_cap(client, service_headers) -> None:
    body = {"coreplus_monthly_cap": 100}
    for headers in (
        user_headers("tenant-a"),
        await service_headers("status:read"),
        await service_headers("tokens:read"),
    ):
        response = await put_cap(client, "tenant-a", body, headers)
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"
    assert (await put_cap(client, "tenant-a", body, {})).status_code == 401
    bad_tenant = await put_cap(client, "a%20b", body, await service_headers("connections:write"))
    assert bad_tenant.status_code == 422


# -- the broker's own calls ----------------------------------------------------------------------


async def test_the_companyinfo_read_of_a_connect_is_counted(
    client, service_headers, stack, new_connection, connect
) -> None:
    conn = await new_connection()
    result = await connect(conn["id"])
    assert result.params["result"] == "connected"
    headers = await service_headers("status:read")

    async def counted() -> bool:
        body = (await client.get("/usage", params={"tenant_id": TENANT}, headers=headers)).json()
        return body["tenants"][0]["coreplus"] >= 1

    await until(counted, "the CompanyInfo read to be counted")
    body = (await client.get("/usage", params={"tenant_id": TENANT}, headers=headers)).json()
    assert body["tenants"] == [{"tenant_id": TENANT, "core": 0, "coreplus": 1, "coreplus_cap": None}]
    from tests.support.db_helpers import fetchrow

    row = await fetchrow(stack.database_url, "SELECT realm_id, call_class FROM quickbooks_usage")
    assert row is not None and (row["realm_id"], row["call_class"]) == (COMPANY_1, "coreplus")
    metrics = (await client.get("/metrics")).text
    assert 'qbo_broker_quickbooks_calls_total{class="coreplus",outcome="ok"}' in metrics
    assert 'qbo_broker_coreplus_budget_threshold_reached{threshold="80"}' in metrics
    assert "\nqbo_broker_coreplus_budget_calls " in metrics
