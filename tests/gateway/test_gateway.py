"""The QuickBooks gateway end to end: a real broker in front of the emulator's Accounting API,
on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from service.main import create_app
from tests.conftest import COMPANY_1, TENANT, Stack, broker_settings, user_headers
from tests.support.db_helpers import fetchrow
from tests.support.servers import ThreadedServer, free_port

QB_SCOPES = ("quickbooks:read", "quickbooks:write")


def invoice_body(customer: str = "3") -> dict[str, Any]:
    return {
        "CustomerRef": {"value": customer},
        "Line": [
            {
                "Amount": 225.0,
                "DetailType": "SalesItemLineDetail",
                "SalesItemLineDetail": {"ItemRef": {"value": "2"}, "Qty": 3, "UnitPrice": 75},
            }
        ],
    }


class QuickBooks:
    """Calls through one broker's gateway, as a service with the QuickBooks scopes."""

    def __init__(self, http: httpx.AsyncClient, connection_id: str, headers: dict[str, str]) -> None:
        self.http = http
        self.base = f"/connections/{connection_id}/quickbooks"
        self.headers = headers

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.http.request(method, f"{self.base}/{path}", headers=headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, json=body, **kwargs)

    async def count(self, query: str) -> int:
        response = await self.get("query", params={"query": query})
        assert response.status_code == 200, response.text
        return int(response.json()["QueryResponse"]["totalCount"])


@pytest.fixture
async def qb(
    client: httpx.AsyncClient,
    linked: Callable[..., Awaitable[str]],
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> QuickBooks:
    return QuickBooks(client, await linked(), await service_headers(*QB_SCOPES))


async def emulator_stats(emulator: httpx.AsyncClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await emulator.get("/stats")).json()
    return stats


async def accounting(emulator: httpx.AsyncClient, realm: str = COMPANY_1) -> dict[str, Any]:
    observed: dict[str, Any] = (await emulator_stats(emulator))["accounting"].get(realm, {})
    return observed


async def refreshes(emulator: httpx.AsyncClient, realm: str = COMPANY_1) -> int:
    return sum((await emulator_stats(emulator))["refresh_by_realm"].get(realm, {}).values())


async def config(emulator: httpx.AsyncClient, **values: Any) -> None:
    (await emulator.post("/config", json=values)).raise_for_status()


async def fault(emulator: httpx.AsyncClient, **spec: Any) -> None:
    assert (await emulator.post("/faults", json=spec)).status_code == 201


async def raw_request(stack: Stack, head: str) -> bytes:
    """Send a request head byte for byte (HTTP clients resolve dots and check lengths) and
    read the answer."""
    host, port = stack.broker_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


# -- pass-through ------------------------------------------------------------------------------


async def test_a_read_comes_back_as_intuit_sent_it(qb: QuickBooks, emulator: httpx.AsyncClient) -> None:
    response = await qb.get("customer/1")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json;charset=UTF-8"
    assert response.headers["intuit_tid"].startswith("1-")
    assert response.json()["Customer"]["DisplayName"] == "Acme Metals"
    assert "quickbooks-request-id" not in response.headers  # reads carry no requestid
    # Without Accept from the caller the broker asks for JSON; with one, the caller's stands.
    xml = await qb.get("customer/1", headers={"Accept": "application/xml"})
    assert xml.headers["content-type"].startswith("application/xml")
    assert xml.text.startswith("<?xml") and "Acme Metals" in xml.text
    # Intuit's own errors pass through with their status and body.
    missing = await qb.get("customer/999")
    assert missing.status_code == 400
    assert missing.json()["Fault"]["Error"][0]["code"] == "610"
    assert (await accounting(emulator))["operations"]["read"] == 3


async def test_each_method_is_forwarded_with_its_body(qb: QuickBooks) -> None:
    created = await qb.post("customer", {"DisplayName": "Metro Scrap"})
    assert created.status_code == 200, created.text
    assert created.headers["quickbooks-request-id"]
    customer = created.json()["Customer"]
    update = await qb.post(
        "customer",
        {
            "Id": customer["Id"],
            "SyncToken": customer["SyncToken"],
            "sparse": True,
            "CompanyName": "Metro Scrap LLC",
        },
    )
    assert update.status_code == 200 and update.json()["Customer"]["CompanyName"] == "Metro Scrap LLC"
    # Intuit has no PUT, PATCH or DELETE: its answer to them is what the caller gets.
    for method in ("PUT", "PATCH", "DELETE"):
        answer = await qb.request(method, "customer", json={"DisplayName": "x"})
        assert answer.status_code == 400, (method, answer.text)
        assert answer.json()["Fault"]["Error"][0]["Message"] == "Unsupported Operation"
        assert answer.headers["quickbooks-request-id"]


async def test_query_strings_with_spaces_and_quotes(qb: QuickBooks) -> None:
    assert (await qb.post("customer", {"DisplayName": "O'Brien"})).status_code == 200
    text = "select * from Customer where DisplayName = 'O''Brien'"
    response = await qb.get("query", params={"query": text})
    assert response.status_code == 200, response.text
    rows = response.json()["QueryResponse"]["Customer"]
    assert [row["DisplayName"] for row in rows] == ["O'Brien"]
    # minorversion is added when absent, and the caller's own is kept.
    assert await qb.count("select count(*) from Customer where DisplayName = 'O''Brien'") == 1
    mine = await qb.get("query", params={"query": text, "minorversion": "75"})
    assert mine.status_code == 200


async def test_idempotency_key_makes_a_repeated_write_do_the_work_once(qb: QuickBooks) -> None:
    key = {"Idempotency-Key": "order-4711"}
    first = await qb.post("invoice", invoice_body(), headers=key)
    again = await qb.post("invoice", invoice_body(), headers=key)
    assert first.status_code == again.status_code == 200
    assert first.headers["quickbooks-request-id"] == again.headers["quickbooks-request-id"]
    assert again.content == first.content
    # The caller's own requestid is used as it is.
    own = await qb.post("invoice", invoice_body(), params={"requestid": "caller-chosen-1"})
    assert own.headers["quickbooks-request-id"] == "caller-chosen-1"
    # Without either, every write gets a new one.
    plain = [await qb.post("invoice", invoice_body()) for _ in range(2)]
    assert plain[0].headers["quickbooks-request-id"] != plain[1].headers["quickbooks-request-id"]
    assert await qb.count("select count(*) from Invoice where CustomerRef = '3'") == 4


async def test_the_same_idempotency_key_on_two_connections_gives_two_requestids(
    client: httpx.AsyncClient,
    linked_company: Callable[[int], Awaitable[tuple[str, str]]],
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> None:
    headers = await service_headers(*QB_SCOPES)
    ids = []
    for index in (1, 2):
        connection_id, _ = await linked_company(index)
        answer = await QuickBooks(client, connection_id, headers).post(
            "customer", {"DisplayName": "Same Key"}, headers={"Idempotency-Key": "k-1"}
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.headers["quickbooks-request-id"])
    assert ids[0] != ids[1]


async def test_a_multipart_upload_larger_than_the_retry_buffer_streams_through(qb: QuickBooks) -> None:
    content = b"%PDF-1.4 " + b"x" * (3 * 1024 * 1024)  # over the 1 MiB read ahead of sending
    metadata = {
        "AttachableRef": [{"EntityRef": {"type": "Invoice", "value": "1"}}],
        "FileName": "weighbridge-ticket.pdf",
        "ContentType": "application/pdf",
    }
    response = await qb.request(
        "POST",
        "upload",
        files={
            "file_metadata_01": (None, json.dumps(metadata), "application/json"),
            "file_content_01": ("weighbridge-ticket.pdf", content, "application/pdf"),
        },
    )
    assert response.status_code == 200, response.text
    attachable = response.json()["AttachableResponse"][0]["Attachable"]
    assert attachable["Size"] == len(content)
    assert attachable["FileName"] == "weighbridge-ticket.pdf"


async def test_bodies_over_the_gateways_limit_are_refused(
    stack: Stack, qb: QuickBooks, emulator: httpx.AsyncClient
) -> None:
    limit = stack.settings.quickbooks_max_body_bytes
    before = (await accounting(emulator)).get("requests", 0)
    # Announced: refused before a byte of it is read.
    over = await raw_request(
        stack,
        f"POST {qb.base}/upload HTTP/1.1\r\nHost: x\r\n"
        f"X-API-Key: {qb.headers['X-API-Key']}\r\n"
        f"Content-Length: {limit + 1}\r\nConnection: close\r\n\r\n",
    )
    assert over.startswith(b"HTTP/1.1 413") and b"payload_too_large" in over

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(limit // (1024 * 1024) + 1):
            yield b"y" * (1024 * 1024)

    streamed = await qb.request(
        "POST", "upload", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert streamed.status_code == 413 and streamed.json()["code"] == "payload_too_large"
    assert (await accounting(emulator)).get("operations", {}).get("upload", 0) == 0
    assert (await accounting(emulator)).get("requests", 0) <= before + 1
    # The app's own (much smaller) limit does not apply to the gateway.
    assert stack.settings.max_body_bytes < 1024 * 1024


async def test_a_large_report_streams_back(qb: QuickBooks, emulator: httpx.AsyncClient) -> None:
    await config(emulator, report_rows=12_000)
    received: list[bytes] = []
    async with qb.http.stream(
        "GET",
        f"{qb.base}/reports/GeneralLedger",
        headers=qb.headers,
        params={"start_date": "2025-01-01", "end_date": "2025-12-31"},
    ) as rsp:
        assert rsp.status_code == 200 and rsp.headers["intuit_tid"]
        assert rsp.headers["transfer-encoding"] == "chunked"
        async for chunk in rsp.aiter_raw():
            received.append(chunk)
    raw = b"".join(received)
    assert len(raw) > 3_000_000 and len(received) > 10
    sections = json.loads(raw)["Rows"]["Row"]
    assert sum(len(s.get("Rows", {}).get("Row", [])) for s in sections) == 12_000


# -- tokens ------------------------------------------------------------------------------------


async def test_a_401_refreshes_once_and_repeats_the_call(qb: QuickBooks, emulator: httpx.AsyncClient) -> None:
    await emulator.post("/clock", json={"advance_s": 3700})  # Intuit now sees the token expired
    response = await qb.get("customer/1")
    assert response.status_code == 200, response.text
    assert await refreshes(emulator) == 1
    assert (await accounting(emulator))["operations"]["read"] == 1  # the 401 is not an operation


async def test_concurrent_401s_share_one_refresh(qb: QuickBooks, emulator: httpx.AsyncClient) -> None:
    await config(emulator, latency_ms=50)
    await emulator.post("/clock", json={"advance_s": 3700})
    answers = await asyncio.gather(*(qb.get("customer/1") for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert await refreshes(emulator) == 1


async def test_invalid_grant_answers_reauthorization_required(
    qb: QuickBooks, emulator: httpx.AsyncClient
) -> None:
    await emulator.post(f"/companies/{COMPANY_1}/disconnect")  # "disconnected in QuickBooks"
    response = await qb.get("customer/1")
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "reauthorization_required"
    again = await qb.post("customer", {"DisplayName": "x"})
    assert again.status_code == 409 and again.json()["code"] == "reauthorization_required"


async def test_a_connection_not_connected_answers_not_connected(
    client: httpx.AsyncClient,
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> None:
    pending = await new_connection()
    qb = QuickBooks(client, pending["id"], await service_headers(*QB_SCOPES))
    response = await qb.get("customer/1")
    assert response.status_code == 409 and response.json()["code"] == "not_connected"


# -- retries -----------------------------------------------------------------------------------


async def test_a_write_whose_answer_is_lost_is_retried_and_done_once(
    qb: QuickBooks, emulator: httpx.AsyncClient
) -> None:
    await fault(emulator, endpoint="accounting", kind="drop_after_commit")
    response = await qb.post("invoice", invoice_body())
    assert response.status_code == 200, response.text
    assert (await emulator.get("/faults")).json() == []  # the fault did fire
    assert await qb.count("select count(*) from Invoice where CustomerRef = '3'") == 1
    assert (await accounting(emulator))["operations"]["create"] == 2  # sent twice, done once


async def test_reads_and_writes_are_retried_after_5xx(qb: QuickBooks, emulator: httpx.AsyncClient) -> None:
    await fault(emulator, endpoint="accounting", kind="status", status=503)
    assert (await qb.get("customer/1")).status_code == 200
    await fault(emulator, endpoint="accounting", kind="status", status=502)
    assert (await qb.post("invoice", invoice_body())).status_code == 200
    assert await qb.count("select count(*) from Invoice where CustomerRef = '3'") == 1
    # Persistent failure: Intuit's last answer, after INTUIT_MAX_ATTEMPTS.
    await fault(emulator, endpoint="accounting", kind="status", status=500, count=3)
    failed = await qb.get("customer/1")
    assert failed.status_code == 500 and failed.json()["Fault"]["type"] == "SystemFault"


async def test_an_intuit_429_pauses_the_realm(
    stack: Stack, qb: QuickBooks, emulator: httpx.AsyncClient
) -> None:
    await fault(emulator, endpoint="accounting", kind="status", status=429, delay_s=1)
    response = await qb.get("customer/1")
    assert response.status_code == 200, response.text
    row = await fetchrow(
        stack.database_url,
        "SELECT paused_until, clock_timestamp() AS now FROM quickbooks_realm_throttles WHERE realm_id = $1",
        COMPANY_1,
    )
    assert row["paused_until"] is not None and row["paused_until"] <= row["now"]


# -- who may call, and where -------------------------------------------------------------------


async def test_scopes_and_callers(
    client: httpx.AsyncClient,
    qb: QuickBooks,
    service_headers: Callable[..., Awaitable[dict[str, str]]],
    emulator: httpx.AsyncClient,
) -> None:
    read_only = await service_headers("quickbooks:read")
    assert (await qb.get("customer/1", headers=read_only)).status_code == 200
    refused = await qb.post("customer", {"DisplayName": "x"}, headers=read_only)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    write_only = await service_headers("quickbooks:write")
    assert (await qb.get("customer/1", headers=write_only)).status_code == 403
    for other in ("status:read", "tokens:read", "connections:write"):
        answer = await qb.get("customer/1", headers=await service_headers(other))
        assert answer.status_code == 403, other
    # Users never call QuickBooks through the broker, whichever tenant the connection is.
    for tenant in (TENANT, "tenant-b"):
        answer = await client.get(f"{qb.base}/customer/1", headers=user_headers(tenant))
        assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
    anonymous = await client.get(f"{qb.base}/customer/1")
    assert anonymous.status_code == 401
    # A caller's credentials never travel on to Intuit, whatever else it sends.
    both = await qb.get("customer/1", headers={"Authorization": "Bearer not-for-intuit"})
    assert both.status_code == 200
    assert (await accounting(emulator))["operations"]["read"] == 2


async def test_an_unknown_connection_is_404(client: httpx.AsyncClient, qb: QuickBooks) -> None:
    response = await client.get(
        "/connections/00000000-0000-4000-8000-000000000000/quickbooks/customer/1", headers=qb.headers
    )
    assert response.status_code == 404 and response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/%2e%2e/other/customer",
        "customer%2F1",
        "customer%5C1",
        "a//b",
        "customer/%2e",
        "customer/%00",
        "customer/%zz",
        "x?y",
    ],
)
async def test_paths_cannot_leave_the_company(qb: QuickBooks, emulator: httpx.AsyncClient, path: str) -> None:
    before = (await accounting(emulator)).get("requests", 0)
    url = httpx.URL(f"{qb.http.base_url}{qb.base}/").copy_with(raw_path=f"{qb.base}/{path}".encode())
    response = await qb.http.get(url, headers=qb.headers)
    if path == "x?y":  # the query string is the caller's, and Intuit judges the path
        assert response.status_code == 400 and "Fault" in response.json()
        return
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_quickbooks_path"
    assert (await accounting(emulator)).get("requests", 0) == before


async def test_a_literal_dot_dot_is_refused(stack: Stack, qb: QuickBooks) -> None:
    # Sent byte for byte (an HTTP client would resolve the dots before sending).
    answer = await raw_request(
        stack,
        f"GET {qb.base}/../../../v3/company/1/customer/1 HTTP/1.1"
        f"\r\nHost: x\r\nX-API-Key: {qb.headers['X-API-Key']}\r\n"
        "Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"invalid_quickbooks_path" in answer


# -- throttles shared by replicas --------------------------------------------------------------

LIMITS = {
    "BROKER_QUICKBOOKS_MAX_IN_FLIGHT": 4,
    "BROKER_QUICKBOOKS_PER_SECOND": 10,
    "BROKER_QUICKBOOKS_PER_MINUTE": 30,
    "BROKER_QUICKBOOKS_QUEUE_SECONDS": 20,
    # Not the 2 s that spreads 30 calls over a minute: the test would take one.
    "BROKER_QUICKBOOKS_MIN_INTERVAL_SECONDS": 0.02,
    # Room for a busy machine's delay between a call's admission and its arrival at the
    # emulator, which counts arrivals (the default 0.1 s is for a server that is not
    # running a test-suite beside the broker).
    "BROKER_QUICKBOOKS_WINDOW_MARGIN_SECONDS": 0.5,
}


# The in-flight limit alone: slots pass from call to call inside each broker.
IN_FLIGHT_ONLY = {
    "BROKER_QUICKBOOKS_MAX_IN_FLIGHT": 3,
    "BROKER_QUICKBOOKS_PER_SECOND": 0,
    "BROKER_QUICKBOOKS_PER_MINUTE": 0,
    "BROKER_QUICKBOOKS_QUEUE_SECONDS": 20,
}


@pytest.fixture
def brokers(stack: Stack) -> Iterator[Callable[[dict[str, Any]], list[str]]]:
    """Two more brokers on the same database and emulator, with the limits given."""
    servers: list[ThreadedServer] = []

    def start(limits: dict[str, Any]) -> list[str]:
        for _ in range(2):
            port = free_port()
            settings = broker_settings(stack.database_url, port, stack.emulator_url, **limits)
            servers.append(ThreadedServer(create_app(settings), port).start())
        return [server.url for server in servers[-2:]]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def two_brokers(brokers: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    return brokers(LIMITS)


async def test_two_brokers_keep_one_company_within_its_limits(
    stack: Stack, qb: QuickBooks, two_brokers: list[str], emulator: httpx.AsyncClient
) -> None:
    # The burst starts right after the Connect: the broker's own CompanyInfo read went through
    # the same throttle, and counts in its windows as it does in Intuit's.
    stamped = await fetchrow(
        stack.database_url,
        "SELECT cardinality(admitted) AS n FROM quickbooks_realm_throttles WHERE realm_id = $1",
        COMPANY_1,
    )
    assert stamped is not None and stamped["n"] >= 1
    burst = 30 - stamped["n"]
    before = (await accounting(emulator))["requests"]
    await config(
        emulator,
        latency_ms=150,
        throttle_concurrent=4,
        throttle_per_second=10,
        throttle_per_minute=30 + before,
    )
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in two_brokers]
    try:
        callers = [QuickBooks(http, qb.base.split("/")[2], qb.headers) for http in clients]
        answers = await asyncio.gather(*(callers[i % 2].get("customer/1") for i in range(burst)))
        assert [a.status_code for a in answers] == [200] * burst
        observed = await accounting(emulator)
        assert observed["requests"] == before + burst and observed["throttled"] == 0
        assert observed["max_in_flight"] <= 4 and observed["max_per_second"] <= 10
        # The minute is used up: the next call would wait longer than the queue allows.
        over = await callers[0].get("customer/1")
        assert over.status_code == 429 and over.json()["code"] == "quickbooks_throttled"
        assert int(over.headers["retry-after"]) >= 1
        assert (await accounting(emulator))["requests"] == before + burst
    finally:
        for http in clients:
            await http.aclose()


async def test_two_brokers_passing_slots_from_call_to_call_keep_the_in_flight_limit(
    qb: QuickBooks, brokers: Callable[[dict[str, Any]], list[str]], emulator: httpx.AsyncClient
) -> None:
    urls = brokers(IN_FLIGHT_ONLY)
    before = await accounting(emulator)
    await config(emulator, latency_ms=20, throttle_concurrent=3, throttle_per_second=0, throttle_per_minute=0)
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in urls]
    try:
        callers = [QuickBooks(http, qb.base.split("/")[2], qb.headers) for http in clients]

        async def back_to_back(caller: QuickBooks) -> list[int]:
            return [(await caller.get("customer/1")).status_code for _ in range(8)]

        answers = await asyncio.gather(*(back_to_back(callers[i % 2]) for i in range(12)))
        assert [status for caller in answers for status in caller] == [200] * 96
        observed = await accounting(emulator)
        assert observed["requests"] == before["requests"] + 96
        assert observed.get("throttled", 0) == before.get("throttled", 0)
        assert observed["max_in_flight"] == 3  # every slot used, never one more
    finally:
        for http in clients:
            await http.aclose()


async def test_a_connect_links_without_the_company_name_when_its_limits_leave_no_room(
    stack: Stack,
    client: httpx.AsyncClient,
    linked: Callable[..., Awaitable[str]],
    emulator: httpx.AsyncClient,
) -> None:
    """Intuit said 429 for the company a moment ago: every replica holds its calls back, the
    Connect flow's CompanyInfo read included; the link is made without the name, rather than
    waiting or failing."""
    await fetchrow(
        stack.database_url,
        "INSERT INTO quickbooks_realm_throttles (realm_id, paused_until) "
        "VALUES ($1, clock_timestamp() + interval '60 seconds') "
        "ON CONFLICT (realm_id) DO UPDATE SET paused_until = excluded.paused_until RETURNING 1",
        COMPANY_1,
    )
    before = (await accounting(emulator)).get("requests", 0)
    connection_id = await linked()
    answer = await client.get(f"/connections/{connection_id}", headers=user_headers())
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "connected" and answer.json()["company_name"] is None
    assert (await accounting(emulator)).get("requests", 0) == before


async def test_a_429_to_the_connects_company_read_pauses_the_company_for_every_replica(
    stack: Stack,
    client: httpx.AsyncClient,
    linked: Callable[..., Awaitable[str]],
    emulator: httpx.AsyncClient,
) -> None:
    """As after a gateway call's 429; the read is tried again once the pause allows, and the
    link gets the company's name."""
    await fault(emulator, endpoint="companyinfo", kind="status", status=429, count=1)
    connection_id = await linked()
    row = await fetchrow(
        stack.database_url,
        "SELECT paused_until FROM quickbooks_realm_throttles WHERE realm_id = $1",
        COMPANY_1,
    )
    assert row is not None and row["paused_until"] is not None
    answer = await client.get(f"/connections/{connection_id}", headers=user_headers())
    assert answer.status_code == 200, answer.text
    assert answer.json()["company_name"]


async def test_slots_of_a_replica_that_died_come_back(stack: Stack, qb: QuickBooks) -> None:
    # Every slot taken, by leases that have lapsed: a crashed replica's (the row is there since
    # the Connect's CompanyInfo read).
    await fetchrow(
        stack.database_url,
        "INSERT INTO quickbooks_realm_throttles (realm_id, leases) VALUES ($1, "
        "array_fill(clock_timestamp() - interval '1 second', ARRAY[10])) "
        "ON CONFLICT (realm_id) DO UPDATE SET leases = excluded.leases RETURNING 1",
        COMPANY_1,
    )
    assert (await qb.get("customer/1")).status_code == 200
