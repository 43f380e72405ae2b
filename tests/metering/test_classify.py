"""Intuit's class of each kind of Accounting API call (INTUIT.md, "Accounting API calls"), through
the classes the gateway meters calls by (service.metering.meter)."""

from __future__ import annotations

import json

import pytest

from service.metering.meter import classify, outcome_for_status


def batch(*items: dict[str, object]) -> bytes:
    return json.dumps({"BatchItemRequest": list(items)}).encode()


CREATE = {"bId": "1", "operation": "create", "Invoice": {"Line": []}}
UPDATE = {"bId": "2", "operation": "update", "Customer": {"Id": "1", "sparse": True}}
DELETE = {"bId": "3", "operation": "delete", "Invoice": {"Id": "9", "SyncToken": "0"}}
QUERY = {"bId": "4", "Query": "select * from Customer"}
CDC = {"bId": "5", "CDCQuery": {"Entities": "Invoice", "ChangedSince": "2026-11-01"}}

CASES = [
    # Reads: every GET, whatever it names.
    ("GET", "invoice/123", None, "coreplus"),
    ("GET", "query", None, "coreplus"),
    ("GET", "reports/ProfitAndLoss", None, "coreplus"),
    ("GET", "cdc", None, "coreplus"),
    ("GET", "companyinfo/123", None, "coreplus"),
    ("GET", "invoice/123/pdf", None, "coreplus"),
    ("get", "customer/1", None, "coreplus"),
    # Reads Intuit accepts as POST.
    ("POST", "query", b"select * from Invoice", "coreplus"),
    ("POST", "Query", b"select * from Invoice", "coreplus"),
    ("POST", "reports/BalanceSheet", None, "coreplus"),
    ("POST", "cdc", None, "coreplus"),
    # Data in: create, update, delete, void, send, upload.
    ("POST", "invoice", b'{"Line": []}', "core"),
    ("POST", "customer", b'{"Id": "1", "sparse": true}', "core"),
    ("POST", "invoice?operation=delete", b'{"Id": "1", "SyncToken": "0"}', "core"),
    ("POST", "invoice?operation=void", b'{"Id": "1", "SyncToken": "0"}', "core"),
    ("POST", "invoice/123/send", None, "core"),
    ("POST", "upload", b"--boundary\r\n...", "core"),
    ("POST", "companyinfo", b'{"Id": "1", "sparse": true}', "core"),  # an update of it
    ("POST", "/invoice/", b"{}", "core"),
    # A batch counts once: a read anywhere in it makes it CorePlus.
    ("POST", "batch", batch(CREATE, UPDATE, DELETE), "core"),
    ("POST", "batch", batch(CREATE), "core"),
    ("POST", "batch", batch(CREATE, QUERY), "coreplus"),
    ("POST", "batch", batch(QUERY), "coreplus"),
    ("POST", "batch", batch(UPDATE, CDC), "coreplus"),
    ("POST", "batch", batch({"bId": "6", "operation": "CREATE", "Item": {}}), "core"),
    ("POST", "batch", batch({"bId": "7", "operation": "create", "Query": "select 1"}), "coreplus"),
    # A batch the broker cannot read counts as the metered class.
    ("POST", "batch", None, "coreplus"),
    ("POST", "batch", b"", "coreplus"),
    ("POST", "batch", b"not json", "coreplus"),
    ("POST", "batch", b"\xff\xfe", "coreplus"),
    ("POST", "batch", b"[]", "coreplus"),
    ("POST", "batch", b'{"BatchItemRequest": []}', "coreplus"),
    ("POST", "batch", b'{"BatchItemRequest": "x"}', "coreplus"),
    ("POST", "batch", batch({"bId": "8", "Invoice": {}}), "coreplus"),  # no operation
    ("POST", "batch", b'{"BatchItemRequest": [1]}', "coreplus"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    CASES,
    ids=[f"{m} {p} {i}" for i, (m, p, _, _) in enumerate(CASES)],
)
def test_classify(method: str, path: str, body: bytes | None, expected: str) -> None:
    assert classify(method, path, body) == expected


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (400, "client_error"),
        (404, "client_error"),
        (401, "unauthorized"),
        (403, "unauthorized"),
        (429, "throttled"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_outcome_for_status(status: int, outcome: str) -> None:
    assert outcome_for_status(status) == outcome
