"""The emulator's Accounting API: entities, query, batch, CDC, reports, upload, requestid,
throttles, metering, faults and authentication, over HTTP as a gateway would call it."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from service.emulator import EmulatorSettings, create_app

SANDBOX = "9341452988354102"
GREENFIELD = "9341452988354203"
BASE = f"/v3/company/{SANDBOX}"
Emu = Any  # tests/emulator/conftest.py's driver, reached through the emu and emu_for fixtures


@pytest.fixture
def settings(settings_for: Any) -> EmulatorSettings:
    # Functional tests send many calls a second; the throttle tests turn the limits back on.
    settings: EmulatorSettings = settings_for(
        throttle_concurrent=0, throttle_per_second=0, throttle_per_minute=0, throttle_batch_per_minute=0
    )
    return settings


class Api:
    """A QuickBooks client for one company: bearer token, JSON, minorversion."""

    def __init__(self, http: httpx.AsyncClient, token: str, realm: str = SANDBOX) -> None:
        self.http = http
        self.token = token
        self.base = f"/v3/company/{realm}"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **extra}

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(
            f"{self.base}/{path}", headers=self.headers(), params={"minorversion": "75", **params}
        )

    async def post(self, path: str, body: Any, **params: Any) -> httpx.Response:
        return await self.http.post(
            f"{self.base}/{path}", headers=self.headers(), json=body, params={"minorversion": "75", **params}
        )

    async def query(self, text: str) -> httpx.Response:
        return await self.get("query", query=text)

    async def rows(self, text: str) -> dict[str, Any]:
        response = await self.query(text)
        assert response.status_code == 200, response.text
        return response.json()["QueryResponse"]


async def config(http: httpx.AsyncClient, **values: Any) -> None:
    response = await http.post("/_emulator/config", json=values)
    assert response.status_code == 200, response.text


async def fault(http: httpx.AsyncClient, **spec: Any) -> None:
    response = await http.post("/_emulator/faults", json=spec)
    assert response.status_code == 201, response.text


async def accounting_stats(http: httpx.AsyncClient, realm: str = SANDBOX) -> dict[str, Any]:
    return (await http.get("/_emulator/stats")).json()["accounting"].get(realm, {})


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["Fault"]["Error"][0]
    return error


def invoice_body(
    customer: str = "1", lines: list[tuple[str, float, float]] | None = None, **extra: Any
) -> dict[str, Any]:
    lines = lines or [("2", 3, 75)]
    return {
        "CustomerRef": {"value": customer},
        **extra,
        "Line": [
            {
                "Amount": round(qty * price, 2),
                "DetailType": "SalesItemLineDetail",
                "SalesItemLineDetail": {"ItemRef": {"value": item}, "Qty": qty, "UnitPrice": price},
            }
            for item, qty, price in lines
        ],
    }


@pytest.fixture
async def api(emu: Emu) -> Api:
    tokens = await emu.tokens("bob@example.com")
    return Api(emu.client, tokens["access_token"])


# -- entities ----------------------------------------------------------------------------------


async def test_seeded_books_and_reads(api: Api) -> None:
    customer = await api.get("customer/1")
    assert customer.status_code == 200 and customer.headers["intuit_tid"]
    assert customer.headers["content-type"].startswith("application/json")
    body = customer.json()
    assert body["time"] and body["Customer"]["DisplayName"] == "Acme Metals"
    assert body["Customer"]["SyncToken"] == "0"
    assert set(body["Customer"]["MetaData"]) == {"CreateTime", "LastUpdatedTime"}
    for path, name in (("item/2", "Hours"), ("account/1", "Sales of Product Income")):
        assert (await api.get(path)).json()[path.split("/")[0].title()]["Name"] == name
    invoice = (await api.get("invoice/1")).json()["Invoice"]
    assert invoice["TotalAmt"] == 921.0 and invoice["DocNumber"] == "1001"
    missing = await api.get("customer/999")
    assert missing.status_code == 400 and error_of(missing)["code"] == "610"


async def test_create_each_entity(api: Api) -> None:
    customer = await api.post(
        "customer", {"DisplayName": "Metro Scrap", "PrimaryEmailAddr": {"Address": "ap@metro.example"}}
    )
    assert customer.status_code == 200, customer.text
    created = customer.json()["Customer"]
    assert created["Id"] == "4" and created["SyncToken"] == "0" and created["Active"] is True
    assert created["PrimaryEmailAddr"] == {"Address": "ap@metro.example"}
    assert (await api.get("customer/4")).json()["Customer"] == created

    account = await api.post("account", {"Name": "Scrap Sales", "AccountType": "Income"})
    assert account.status_code == 200, account.text
    account_id = account.json()["Account"]["Id"]
    assert account.json()["Account"]["Classification"] == "Revenue"

    item = await api.post(
        "item",
        {
            "Name": "Aluminium cans (lb)",
            "Type": "NonInventory",
            "UnitPrice": 0.62,
            "IncomeAccountRef": {"value": account_id},
        },
    )
    assert item.status_code == 200, item.text
    item_id = item.json()["Item"]["Id"]
    assert item.json()["Item"]["IncomeAccountRef"] == {"value": account_id, "name": "Scrap Sales"}

    invoice = await api.post("invoice", invoice_body("4", [(item_id, 1000, 0.62), ("2", 2, 75)]))
    assert invoice.status_code == 200, invoice.text
    document = invoice.json()["Invoice"]
    assert document["TotalAmt"] == 770.0 and document["Balance"] == 770.0
    assert document["DocNumber"] == "1003"  # the seed used 1001 and 1002
    assert document["CustomerRef"] == {"value": "4", "name": "Metro Scrap"}
    assert [line["DetailType"] for line in document["Line"]] == [
        "SalesItemLineDetail",
        "SalesItemLineDetail",
        "SubTotalLineDetail",
    ]
    assert document["Line"][0]["Id"] == "1" and document["Line"][2]["Amount"] == 770.0


async def test_validation_faults(api: Api) -> None:
    duplicate = await api.post("customer", {"DisplayName": "acme metals"})
    assert duplicate.status_code == 400 and error_of(duplicate)["code"] == "6240"
    assert duplicate.json()["Fault"]["type"] == "ValidationFault"
    wrapped = await api.post("customer", {"Customer": {"DisplayName": "Wrapped"}})
    assert error_of(wrapped)["code"] == "2010"  # the body is the entity itself
    assert error_of(await api.post("customer", {"Notes": "no name"}))["code"] == "6080"
    assert error_of(await api.post("item", {"Name": "No account", "Type": "Service"}))["code"] == "2020"
    assert error_of(await api.post("account", {"Name": "Odd", "AccountType": "Odd"}))["code"] == "2170"
    no_customer = await api.post("invoice", {"Line": invoice_body()["Line"]})
    assert error_of(no_customer)["code"] == "2020"
    assert error_of(await api.post("invoice", invoice_body("99")))["code"] == "2500"
    assert error_of(await api.post("invoice", invoice_body("1", [("99", 1, 1)])))["code"] == "2500"
    wrong_amount = invoice_body()
    wrong_amount["Line"][0]["Amount"] = 1
    assert error_of(await api.post("invoice", wrong_amount))["code"] == "6070"
    not_json = await api.http.post(
        f"{BASE}/customer", headers=api.headers(**{"Content-Type": "application/json"}), content=b"{not json"
    )
    assert not_json.status_code == 400 and error_of(not_json)["code"] == "2010"
    text_body = await api.http.post(
        f"{BASE}/customer", headers=api.headers(**{"Content-Type": "text/plain"}), content=b"DisplayName"
    )
    assert text_body.status_code == 415


async def test_sparse_and_full_update_with_sync_tokens(api: Api) -> None:
    current = (await api.get("customer/2")).json()["Customer"]
    sparse = await api.post(
        "customer", {"Id": "2", "SyncToken": current["SyncToken"], "sparse": True, "Notes": "windsurf boards"}
    )
    assert sparse.status_code == 200, sparse.text
    updated = sparse.json()["Customer"]
    assert updated["SyncToken"] == "1" and updated["Notes"] == "windsurf boards"
    assert updated["PrimaryEmailAddr"] == current["PrimaryEmailAddr"]  # sparse keeps the rest
    assert updated["MetaData"]["CreateTime"] == current["MetaData"]["CreateTime"]

    stale = await api.post("customer", {"Id": "2", "SyncToken": "0", "sparse": True, "Notes": "lost"})
    assert stale.status_code == 400
    assert error_of(stale)["code"] == "5010" and error_of(stale)["Message"] == "Stale Object Error"
    assert (await api.get("customer/2")).json()["Customer"]["Notes"] == "windsurf boards"

    full = await api.post("customer", {"Id": "2", "SyncToken": "1", "DisplayName": "Bill's Windsurf Shop"})
    assert full.status_code == 200
    assert "Notes" not in full.json()["Customer"]  # a full update clears what it leaves out
    assert "PrimaryEmailAddr" not in full.json()["Customer"]
    assert full.json()["Customer"]["SyncToken"] == "2"

    no_token = await api.post("customer", {"Id": "2", "sparse": True, "Notes": "x"})
    assert error_of(no_token)["code"] == "2020"
    unknown = await api.post("customer", {"Id": "77", "SyncToken": "0", "sparse": True})
    assert error_of(unknown)["code"] == "610"

    lines = await api.post(
        "invoice",
        {"Id": "2", "SyncToken": "0", "sparse": True, "Line": invoice_body(lines=[("2", 1, 75)])["Line"]},
    )
    assert lines.json()["Invoice"]["TotalAmt"] == 75.0
    assert lines.json()["Invoice"]["DocNumber"] == "1002"


async def test_delete_void_and_send_an_invoice(api: Api) -> None:
    created = (await api.post("invoice", invoice_body())).json()["Invoice"]
    stale = await api.post("invoice", {"Id": created["Id"], "SyncToken": "5"}, operation="delete")
    assert error_of(stale)["code"] == "5010"
    deleted = await api.post("invoice", {"Id": created["Id"], "SyncToken": "0"}, operation="delete")
    assert deleted.status_code == 200
    assert deleted.json()["Invoice"] == {"status": "Deleted", "domain": "QBO", "Id": created["Id"]}
    gone = await api.get(f"invoice/{created['Id']}")
    assert gone.status_code == 400 and error_of(gone)["code"] == "610"
    assert "deleted" in error_of(gone)["Detail"]

    name_list = await api.post("customer", {"Id": "3", "SyncToken": "0"}, operation="delete")
    assert name_list.status_code == 400 and error_of(name_list)["code"] == "500"

    voided = await api.post("invoice", {"Id": "1", "SyncToken": "0"}, operation="void")
    assert voided.status_code == 200, voided.text
    document = voided.json()["Invoice"]
    assert document["TotalAmt"] == 0 and document["Balance"] == 0
    assert document["PrivateNote"] == "Voided" and document["SyncToken"] == "1"

    no_address = await api.post("invoice/2/send", None)
    assert no_address.status_code == 400 and error_of(no_address)["code"] == "6000"
    sent = await api.post("invoice/2/send", None, sendTo="surf@intuit.example")
    assert sent.status_code == 200, sent.text
    assert sent.json()["Invoice"]["EmailStatus"] == "EmailSent"
    assert (await api.post("invoice/2/send", None, sendTo="nope")).status_code == 400


# -- query -------------------------------------------------------------------------------------


async def test_query_forms(api: Api) -> None:
    everyone = await api.rows("select * from Customer")
    assert [c["DisplayName"] for c in everyone["Customer"]] == [
        "Acme Metals",
        "Bill's Windsurf Shop",
        "Cool Cars",
    ]
    assert everyone["startPosition"] == 1 and everyone["maxResults"] == 3
    assert await api.rows("select count(*) from Customer") == {"totalCount": 3}
    assert await api.rows("SELECT COUNT(*) FROM Invoice") == {"totalCount": 2}
    by_id = await api.rows("select * from Customer where Id = '2'")
    assert [c["Id"] for c in by_id["Customer"]] == ["2"]
    quoted = await api.rows("select * from Customer where DisplayName = 'Bill\\'s Windsurf Shop'")
    assert [c["Id"] for c in quoted["Customer"]] == ["2"]
    spaced = await api.rows("  SeLeCt   *   FrOm   customer   WHERE   displayname='Cool Cars'  ")
    assert [c["Id"] for c in spaced["Customer"]] == ["3"]
    assert await api.rows("select * from Customer where DisplayName = 'Nobody'") == {}
    like = await api.rows("select * from Item where Name like '%(%' orderby Name desc")
    assert [i["Name"] for i in like["Item"]] == ["Scrap Steel (ton)", "Copper #2 (lb)"]
    listed = await api.rows("select * from Customer where Id in ('1', '3')")
    assert [c["Id"] for c in listed["Customer"]] == ["1", "3"]
    money = await api.rows("select * from Invoice where TotalAmt > '1000.00'")
    assert [i["DocNumber"] for i in money["Invoice"]] == ["1002"]
    projected = await api.rows("select Id, DisplayName from Customer maxresults 1")
    assert projected["Customer"] == [
        {"domain": "QBO", "sparse": True, "Id": "1", "DisplayName": "Acme Metals"}
    ]
    assert await api.rows("select * from Vendor") == {}  # a real entity this company lacks

    posted = await api.http.post(
        f"{BASE}/query",
        headers=api.headers(**{"Content-Type": "application/text"}),
        content=b"select count(*) from Item",
    )
    assert posted.status_code == 200 and posted.json()["QueryResponse"] == {"totalCount": 4}


async def test_query_paging_and_inactive_entries(api: Api) -> None:
    for number in range(1, 13):
        response = await api.post("customer", {"DisplayName": f"Paging {number:02d}"})
        assert response.status_code == 200
    page = await api.rows(
        "select * from Customer where DisplayName like 'Paging%' startposition 6 maxresults 5"
    )
    assert page["startPosition"] == 6 and page["maxResults"] == 5
    assert [c["DisplayName"] for c in page["Customer"]] == [f"Paging {n:02d}" for n in range(6, 11)]
    tail = await api.rows(
        "select * from Customer where DisplayName like 'Paging%' STARTPOSITION 11 MAXRESULTS 1000"
    )
    assert tail["maxResults"] == 2

    await api.post("customer", {"Id": "3", "SyncToken": "0", "sparse": True, "Active": False})
    assert (await api.rows("select count(*) from Customer"))["totalCount"] == 14
    everything = await api.rows("select count(*) from Customer where Active in (true, false)")
    assert everything["totalCount"] == 15
    assert (await api.rows("select * from Customer where Active = false"))["Customer"][0]["Id"] == "3"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "4000"),
        ("select * form Customer", "4000"),
        ("select * from Customer where Id = '1' or Id = '2'", "4000"),
        ("select * from Customer where DisplayName = 'Bill's'", "4000"),
        ("select * from Customer where Id != '1'", "4000"),
        ("select * from Customer where Id = '1' %", "4000"),
        ("select * from Customer maxresults 1001", "4001"),
        ("select * from Customers", "4001"),
        ("select * from Customer where Notes = 'x'", "4001"),
    ],
)
async def test_malformed_queries_are_faults(api: Api, text: str, code: str) -> None:
    response = await api.query(text)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == code
    assert error["Detail"].startswith("QueryParserError" if code == "4000" else "QueryValidationError")


# -- batch, cdc, reports, upload ---------------------------------------------------------------


async def test_batch_mixes_operations_and_faults(api: Api) -> None:
    response = await api.post(
        "batch",
        {
            "BatchItemRequest": [
                {"bId": "c1", "operation": "create", "Customer": {"DisplayName": "Batch Buyer"}},
                {"bId": "c2", "operation": "create", "Customer": {"DisplayName": "Acme Metals"}},
                {
                    "bId": "u1",
                    "operation": "update",
                    "Customer": {"Id": "1", "SyncToken": "0", "sparse": True, "Notes": "batched"},
                },
                {
                    "bId": "u2",
                    "operation": "update",
                    "Customer": {"Id": "2", "SyncToken": "9", "sparse": True, "Notes": "stale"},
                },
                {"bId": "d1", "operation": "delete", "Invoice": {"Id": "2", "SyncToken": "0"}},
                {"bId": "q1", "Query": "select count(*) from Invoice"},
                {"bId": "x1", "Customer": {"DisplayName": "No operation"}},
            ]
        },
    )
    assert response.status_code == 200, response.text
    items = {item["bId"]: item for item in response.json()["BatchItemResponse"]}
    assert list(items) == ["c1", "c2", "u1", "u2", "d1", "q1", "x1"]
    assert items["c1"]["Customer"]["DisplayName"] == "Batch Buyer"
    assert items["c2"]["Fault"]["Error"][0]["code"] == "6240"
    assert items["u1"]["Customer"]["Notes"] == "batched"
    assert items["u2"]["Fault"]["Error"][0]["code"] == "5010"
    assert items["d1"]["Invoice"]["status"] == "Deleted"
    assert items["q1"]["QueryResponse"] == {"totalCount": 1}
    assert items["x1"]["Fault"]["Error"][0]["code"] == "2020"

    too_many = await api.post(
        "batch", {"BatchItemRequest": [{"bId": str(n), "Query": "select * from Item"} for n in range(31)]}
    )
    assert too_many.status_code == 400 and error_of(too_many)["code"] == "1040"
    thirty = await api.post(
        "batch",
        {"BatchItemRequest": [{"bId": str(n), "Query": "select count(*) from Item"} for n in range(30)]},
    )
    assert thirty.status_code == 200 and len(thirty.json()["BatchItemResponse"]) == 30


async def test_cdc_reports_changes_and_deletes(api: Api) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    changed = (await api.post("customer", {"DisplayName": "Changed Co"})).json()["Customer"]
    invoice = (await api.post("invoice", invoice_body(changed["Id"]))).json()["Invoice"]
    await api.post("invoice", {"Id": "1", "SyncToken": "0", "sparse": True, "PrivateNote": "x"})
    await api.post("invoice", {"Id": invoice["Id"], "SyncToken": "0"}, operation="delete")

    response = await api.get("cdc", entities="Customer,Invoice,Item", changedSince=since.isoformat())
    assert response.status_code == 200, response.text
    [block] = response.json()["CDCResponse"]
    customers, invoices, items = block["QueryResponse"]
    assert [c["Id"] for c in customers["Customer"]] == [changed["Id"]]
    by_id = {i["Id"]: i for i in invoices["Invoice"]}
    assert set(by_id) == {"1", invoice["Id"]}
    assert by_id[invoice["Id"]]["status"] == "Deleted"
    assert by_id["1"]["PrivateNote"] == "x" and "status" not in by_id["1"]
    assert items == {}  # nothing changed

    later = await api.get(
        "cdc", entities="Customer", changedSince=(datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    )
    assert later.json()["CDCResponse"][0]["QueryResponse"] == [{}]
    too_old = await api.get("cdc", entities="Customer", changedSince="2001-01-01T00:00:00Z")
    assert too_old.status_code == 400 and error_of(too_old)["code"] == "4001"
    assert (await api.get("cdc", entities="Customer")).status_code == 400


async def test_a_multi_megabyte_report_is_streamed(live_server: str, emu_for: Any) -> None:
    async with httpx.AsyncClient(base_url=live_server, timeout=30) as http:
        api = Api(http, (await emu_for(http).tokens("bob@example.com"))["access_token"])
        await config(http, report_rows=12_000)
        received: list[bytes] = []
        async with http.stream(
            "GET",
            f"{api.base}/reports/GeneralLedger",
            headers=api.headers(),
            params={"start_date": "2025-01-01", "end_date": "2025-12-31", "minorversion": "75"},
        ) as response:
            assert response.status_code == 200 and response.headers["intuit_tid"]
            assert "content-length" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            async for chunk in response.aiter_raw():
                received.append(chunk)
        raw = b"".join(received)
        assert len(raw) > 3_000_000 and len(received) > 10
        report = json.loads(raw)
        assert report["Header"]["ReportName"] == "GeneralLedger"
        assert report["Header"]["StartPeriod"] == "2025-01-01"
        assert len(report["Columns"]["Column"]) == 8
        sections = report["Rows"]["Row"]
        assert sum(len(s.get("Rows", {}).get("Row", [])) for s in sections) == 12_000

        again = await http.get(
            f"{api.base}/reports/GeneralLedger",
            headers=api.headers(),
            params={"start_date": "2025-01-01", "end_date": "2025-12-31"},
        )
        assert again.json()["Rows"] == report["Rows"]  # deterministic
        unknown = await api.get("reports/NoSuchReport")
        assert unknown.status_code == 400 and error_of(unknown)["code"] == "500"
        stats = await accounting_stats(http)
        assert stats["in_flight"] == 0 and stats["operations"]["report"] == 3


async def test_small_reports_and_xml(api: Api) -> None:
    await config(api.http, report_rows=0)
    empty = (await api.get("reports/ProfitAndLoss")).json()
    assert empty["Rows"] == {} and {"Name": "NoReportData", "Value": "true"} in empty["Header"]["Option"]
    await config(api.http, report_rows=120)
    report = (await api.get("reports/ProfitAndLoss")).json()
    assert report["Header"]["DateMacro"] == "this calendar year-to-date"
    assert [s["group"] for s in report["Rows"]["Row"]] == ["Income", "COGS", "Expenses", "GrandTotal"]
    xml = await api.http.get(
        f"{BASE}/reports/ProfitAndLoss",
        headers={"Authorization": f"Bearer {api.token}", "Accept": "application/xml"},
    )
    assert xml.headers["content-type"].startswith("application/xml")
    assert xml.text.startswith('<?xml version="1.0"') and xml.text.endswith("</Report>")


async def test_multipart_upload_answers_attachables(api: Api) -> None:
    metadata = {
        "AttachableRef": [{"EntityRef": {"type": "Invoice", "value": "1"}}],
        "FileName": "weighbridge-ticket.pdf",
        "ContentType": "application/pdf",
    }
    response = await api.http.post(
        f"{BASE}/upload",
        headers=api.headers(),
        files={
            "file_metadata_01": (None, json.dumps(metadata), "application/json"),
            "file_content_01": ("weighbridge-ticket.pdf", b"%PDF-1.4 " + b"x" * 5000, "application/pdf"),
            "file_content_02": ("note.txt", b"plain", "text/plain"),
        },
    )
    assert response.status_code == 200, response.text
    first, second = response.json()["AttachableResponse"]
    attachable = first["Attachable"]
    assert attachable["FileName"] == "weighbridge-ticket.pdf" and attachable["Size"] == 5009
    assert attachable["AttachableRef"][0]["EntityRef"] == {"type": "Invoice", "value": "1"}
    assert second["Attachable"]["FileName"] == "note.txt"
    assert second["Attachable"]["ContentType"] == "text/plain"
    assert (await api.get(f"attachable/{attachable['Id']}")).json()["Attachable"]["Size"] == 5009

    dangling = await api.http.post(
        f"{BASE}/upload",
        headers=api.headers(),
        files={
            "file_metadata_01": (
                None,
                json.dumps({"AttachableRef": [{"EntityRef": {"type": "Invoice", "value": "999"}}]}),
                "application/json",
            ),
            "file_content_01": ("a.txt", b"a", "text/plain"),
        },
    )
    assert dangling.json()["AttachableResponse"][0]["Fault"]["Error"][0]["code"] == "2500"
    not_multipart = await api.post("upload", {"FileName": "x"})
    assert not_multipart.status_code == 415


# -- requestid and lost answers ----------------------------------------------------------------


async def test_requestid_replays_the_original_answer(api: Api) -> None:
    body = invoice_body("3")
    first = await api.post("invoice", body, requestid="inv-001")
    again = await api.post("invoice", body, requestid="inv-001")
    assert first.status_code == again.status_code == 200
    assert again.content == first.content  # the same answer, time stamp included
    assert again.headers["intuit_tid"] != first.headers["intuit_tid"]
    assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 1

    # A failed write is remembered too; a fresh id does the work again.
    stale = await api.post("customer", {"Id": "1", "SyncToken": "7", "sparse": True}, requestid="upd-1")
    assert (
        await api.post("customer", {"Id": "1", "SyncToken": "0", "sparse": True}, requestid="upd-1")
    ).content == stale.content

    # Without a requestid a resent create is a second invoice.
    await api.post("invoice", body)
    await api.post("invoice", body)
    assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 3
    too_long = await api.post("invoice", body, requestid="r" * 51)
    assert too_long.status_code == 400 and error_of(too_long)["code"] == "6000"


async def test_concurrent_resends_with_one_requestid_create_one_invoice(api: Api) -> None:
    await config(api.http, latency_ms=50)
    answers = await asyncio.gather(
        *(api.post("invoice", invoice_body("3"), requestid="same") for _ in range(5))
    )
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 1


async def test_drop_after_commit_then_a_retry_with_the_requestid(live_server: str, emu_for: Any) -> None:
    async with httpx.AsyncClient(base_url=live_server, timeout=5) as http:
        api = Api(http, (await emu_for(http).tokens("bob@example.com"))["access_token"])
        await fault(http, endpoint="accounting", kind="drop_after_commit")
        # Reads pass the fault by: it waits for a write.
        assert (await api.get("customer/1")).status_code == 200
        with pytest.raises(httpx.TransportError):
            await api.post("invoice", invoice_body("3"), requestid="lost-answer-1")
        assert (await http.get("/_emulator/faults")).json() == []
        retry = await api.post("invoice", invoice_body("3"), requestid="lost-answer-1")
        assert retry.status_code == 200, retry.text
        assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 1
        assert retry.json()["Invoice"]["Id"] == "3"

        # The same lost answer without a requestid: the resend duplicates the invoice.
        await fault(http, endpoint="accounting", kind="drop_after_commit")
        with pytest.raises(httpx.TransportError):
            await api.post("invoice", invoice_body("3"))
        await api.post("invoice", invoice_body("3"))
        assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 3
        stats = (await http.get("/_emulator/stats")).json()
        assert stats["faults_fired"] == {"accounting": 2}


async def test_status_and_timeout_faults(api: Api) -> None:
    for status in (500, 503, 429):
        await fault(api.http, endpoint="accounting", kind="status", status=status)
        response = await api.post("invoice", invoice_body("3"), requestid=f"f-{status}")
        assert response.status_code == status and response.headers["intuit_tid"]
        assert response.json()["Fault"]["Error"][0]["code"] == ("3001" if status == 429 else "10000")
        if status == 429:
            assert response.headers["retry-after"] == "1"
        # Nothing was done, and nothing remembered: the retry does the work.
        assert (await api.post("invoice", invoice_body("3"), requestid=f"f-{status}")).status_code == 200
    assert (await api.rows("select count(*) from Invoice where CustomerRef = '3'"))["totalCount"] == 3
    await fault(api.http, endpoint="accounting", kind="timeout", delay_s=0.2)
    started = time.monotonic()
    assert (await api.get("customer/1")).status_code == 200
    assert time.monotonic() - started >= 0.2
    assert (await accounting_stats(api.http))["throttled_by"] == {"fault": 1}
    bad = await api.http.post("/_emulator/faults", json={"endpoint": "token", "kind": "drop_after_commit"})
    assert bad.status_code == 422


# -- throttles and what the emulator observed --------------------------------------------------


async def test_eleven_concurrent_requests_one_is_throttled(api: Api) -> None:
    await config(api.http, throttle_concurrent=10, throttle_per_second=0, latency_ms=300)
    answers = await asyncio.gather(*(api.get("customer/1") for _ in range(11)))
    throttled = [a for a in answers if a.status_code == 429]
    assert len(throttled) == 1 and sum(a.status_code == 200 for a in answers) == 10
    assert int(throttled[0].headers["retry-after"]) >= 1
    error = error_of(throttled[0])
    assert error["code"] == "3001" and "ThrottleExceeded" in error["Message"]
    stats = await accounting_stats(api.http)
    assert stats["max_in_flight"] == 11 and stats["in_flight"] == 0
    assert stats["throttled"] == 1 and stats["throttled_by"] == {"concurrent": 1}


async def test_eleven_requests_in_one_second(api: Api) -> None:
    await config(api.http, throttle_per_second=10)
    answers = [await api.get("customer/1") for _ in range(11)]
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert answers[-1].headers["retry-after"] == "1"
    stats = await accounting_stats(api.http)
    assert stats["max_per_second"] == 11 and stats["throttled_by"] == {"per_second": 1}
    assert stats["requests"] == 10  # admitted; the refused one is only observed
    await asyncio.sleep(1.05)
    assert (await api.get("customer/1")).status_code == 200


async def test_per_minute_and_batch_limits(api: Api) -> None:
    await config(api.http, throttle_per_minute=6, throttle_batch_per_minute=2)
    batch = {"BatchItemRequest": [{"bId": "1", "Query": "select count(*) from Item"}]}
    assert (await api.post("batch", batch)).status_code == 200
    assert (await api.post("batch", batch)).status_code == 200
    refused = await api.post("batch", batch)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 1
    for _ in range(4):
        assert (await api.get("item/1")).status_code == 200
    over = await api.get("item/1")
    assert over.status_code == 429 and 1 < int(over.headers["retry-after"]) <= 60
    stats = await accounting_stats(api.http)
    assert stats["throttled_by"] == {"batch_per_minute": 1, "per_minute": 1}
    assert stats["max_batch_per_minute"] == 3 and stats["max_per_minute"] == 8

    # Another company has its own budget, and reset forgets everything.
    await api.http.post("/_emulator/reset")
    assert await accounting_stats(api.http) == {}
    assert (await api.http.get("/_emulator/config")).json()["throttle_per_minute"] == 0


async def test_default_limits_are_intuits(settings_for: Any, emu_for: Any) -> None:
    app = create_app(settings_for())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9100"
    ) as http:
        values = (await http.get("/_emulator/config")).json()
        assert (
            values["throttle_concurrent"],
            values["throttle_per_second"],
            values["throttle_per_minute"],
            values["throttle_batch_per_minute"],
        ) == (10, 10, 500, 120)
        api = Api(http, (await emu_for(http).tokens("bob@example.com"))["access_token"])
        answers = [await api.get("customer/1") for _ in range(11)]
        assert answers[-1].status_code == 429


async def test_metering_classes(api: Api, emu: Emu) -> None:
    await api.post("customer", {"DisplayName": "Metered"})  # core
    await api.post("invoice", {"Id": "1", "SyncToken": "0", "sparse": True, "PrivateNote": "n"})  # core
    await api.get("customer/1")  # coreplus
    await api.query("select * from Item")  # coreplus
    await api.get("reports/ProfitAndLoss")  # coreplus
    await api.get("cdc", entities="Customer", changedSince=datetime.now(UTC).isoformat())  # coreplus
    await emu.companyinfo(api.token)  # coreplus
    await api.post(
        "batch",
        {
            "BatchItemRequest": [  # writes only: core
                {"bId": "1", "operation": "create", "Customer": {"DisplayName": "B1"}}
            ]
        },
    )
    await api.post(
        "batch",
        {
            "BatchItemRequest": [  # reads: coreplus
                {"bId": "1", "operation": "create", "Customer": {"DisplayName": "B2"}},
                {"bId": "2", "Query": "select * from Customer"},
            ]
        },
    )
    stats = await accounting_stats(api.http)
    assert (stats["core"], stats["coreplus"]) == (3, 6)
    assert stats["operations"] == {
        "create": 1,
        "update": 1,
        "read": 1,
        "query": 1,
        "report": 1,
        "cdc": 1,
        "companyinfo": 1,
        "batch": 2,
    }
    assert stats["requests"] == 9


# -- authentication, paths, formats ------------------------------------------------------------


def assert_3200(response: httpx.Response) -> None:
    assert response.status_code == 401 and response.headers["intuit_tid"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["Fault"]["type"] == "AUTHENTICATION" and body["time"]
    assert body["Fault"]["Error"][0]["code"] == "3200"
    assert body["Fault"]["Error"][0]["Message"] == (
        "message=AuthenticationFailed; errorCode=003200; statusCode=401"
    )


async def test_tokens_must_be_live_and_for_the_company(emu: Emu) -> None:
    http = emu.client
    assert_3200(await http.get(f"{BASE}/customer/1", headers={"Accept": "application/json"}))
    assert_3200(await Api(http, "garbage").get("customer/1"))

    greenfield = await emu.tokens("alice@example.com", GREENFIELD)
    assert_3200(await Api(http, greenfield["access_token"]).get("customer/1"))  # wrong realm
    assert (await Api(http, greenfield["access_token"], GREENFIELD).get("customer/1")).status_code == 200

    bob = await emu.tokens("bob@example.com")
    api = Api(http, bob["access_token"])
    assert (await api.get("customer/1")).status_code == 200
    await http.post(f"/_emulator/companies/{SANDBOX}/disconnect")  # disconnected in QuickBooks
    assert_3200(await api.get("customer/1"))
    assert_3200(await api.post("customer", {"DisplayName": "After disconnect"}))

    dave = await emu.tokens("dave@example.com", SANDBOX)
    await emu.revoke(dave["refresh_token"])
    assert_3200(await Api(http, dave["access_token"]).get("customer/1"))

    await config(http, access_token_ttl=60)
    short = await emu.tokens("bob@example.com")
    await http.post("/_emulator/clock", json={"advance_s": 61})
    expired = await Api(http, short["access_token"]).get("customer/1")
    assert_3200(expired)
    assert "expired" in expired.json()["Fault"]["Error"][0]["Detail"]

    no_company = await emu.tokens("bob@example.com", scope="openid email")
    assert_3200(await Api(http, no_company["access_token"]).get("customer/1"))
    stats = await accounting_stats(http)
    assert stats["requests"] == 1  # refused tokens are neither throttled nor metered


async def test_paths_are_case_sensitive_and_methods_checked(api: Api) -> None:
    for path in ("Customer/1", "customers", "invoice/1/pdf", "Query"):
        response = await api.get(path)
        assert response.status_code == 400 and response.headers["intuit_tid"], path
        assert error_of(response)["Message"] == "Unsupported Operation"
    wrong_method = await api.http.delete(f"{BASE}/customer/1", headers=api.headers())
    assert wrong_method.status_code == 400 and "DELETE" in error_of(wrong_method)["Detail"]
    assert (await api.get("customer/1", minorversion="4")).status_code == 200


async def test_without_accept_json_the_answer_is_xml(api: Api) -> None:
    response = await api.http.get(f"{BASE}/customer/2", headers={"Authorization": f"Bearer {api.token}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    assert '<Customer domain="QBO" sparse="false">' in response.text
    assert "<DisplayName>Bill's Windsurf Shop</DisplayName>" in response.text
    fault_xml = await api.http.get(f"{BASE}/customer/99", headers={"Authorization": f"Bearer {api.token}"})
    assert '<Fault type="ValidationFault"><Error code="610"' in fault_xml.text


# -- change records, persistence ---------------------------------------------------------------


async def test_change_listeners_see_every_write(settings: EmulatorSettings, emu_for: Any) -> None:
    app = create_app(settings)
    seen: list[Any] = []
    app.state.emulator.books.listeners.append(seen.append)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9100"
    ) as http:
        api = Api(http, (await emu_for(http).tokens("bob@example.com"))["access_token"])
        created = (await api.post("invoice", invoice_body())).json()["Invoice"]
        await api.post("invoice", {"Id": created["Id"], "SyncToken": "0"}, operation="void")
        await api.post("invoice", {"Id": created["Id"], "SyncToken": "1"}, operation="delete")
        await api.get(f"invoice/{created['Id']}")
    assert [(c.realm_id, c.entity, c.entity_id, c.operation) for c in seen] == [
        (SANDBOX, "Invoice", created["Id"], op) for op in ("Create", "Void", "Delete")
    ]
    assert all(c.time > 0 for c in seen)


async def test_books_persist_in_the_state_file(state_file: Any, settings_for: Any, emu_for: Any) -> None:
    settings = settings_for(state_file=str(state_file))

    def client_for(app: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9100")

    async with client_for(create_app(settings)) as http:
        tokens = await emu_for(http).tokens("bob@example.com")
        api = Api(http, tokens["access_token"])
        created = (await api.post("customer", {"DisplayName": "Persisted"})).json()["Customer"]
        await api.post("invoice", {"Id": "2", "SyncToken": "0"}, operation="delete")
    async with client_for(create_app(settings)) as http:
        api = Api(http, tokens["access_token"])
        assert (await api.get(f"customer/{created['Id']}")).json()["Customer"] == created
        assert (await api.get("invoice/2")).status_code == 400
        since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        cdc = (await api.get("cdc", entities="Invoice", changedSince=since)).json()
        assert cdc["CDCResponse"][0]["QueryResponse"][0]["Invoice"][0]["status"] == "Deleted"
