"""Reading Intuit's notifications (both formats) and checking their signatures, without I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

from service.intuit_webhooks.payloads import EntityChange, parse
from service.intuit_webhooks.signature import verify

# Intuit's published samples (the 2025 announcement of the CloudEvents format).
LEGACY_SAMPLE = {
    "eventNotifications": [
        {
            "realmId": "310687",
            "dataChangeEvent": {
                "entities": [
                    {
                        "id": "1234",
                        "operation": "Create",
                        "name": "Account",
                        "lastUpdated": "2025-09-08T20:52:31.657Z",
                    }
                ]
            },
        }
    ]
}
CLOUDEVENTS_SAMPLE = [
    {
        "specversion": "1.0",
        "id": "88cd52aa-33b6-4351-9aa4-47572edbd068",
        "source": "intuit.dsnBgbseACLLRZNxo2dfc4evmEJdxde58xeeYcZliOU=",
        "type": "qbo.account.created.v1",
        "datacontenttype": "application/json",
        "time": "2025-09-10T21:31:25.179851517Z",
        "intuitentityid": "1234",
        "intuitaccountid": "310687",
        "data": {},
    }
]


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_intuits_samples_read_as_entity_changes() -> None:
    assert parse(body(LEGACY_SAMPLE)).changes == [
        EntityChange(
            "310687", "Account", "1234", "Create", datetime(2025, 9, 8, 20, 52, 31, 657000, tzinfo=UTC)
        )
    ]
    assert parse(body(CLOUDEVENTS_SAMPLE)).changes == [
        EntityChange(
            "310687", "Account", "1234", "Create", datetime(2025, 9, 10, 21, 31, 25, 179851, tzinfo=UTC)
        )
    ]


def test_one_change_in_both_formats_has_one_key() -> None:
    legacy = parse(
        body(
            {
                "eventNotifications": [
                    {
                        "realmId": "9341452988354102",
                        "dataChangeEvent": {
                            "entities": [
                                {
                                    "name": "BillPayment",
                                    "id": "88",
                                    "operation": "Void",
                                    "lastUpdated": "2026-12-01T05:10:07-0800",
                                }
                            ]
                        },
                    }
                ]
            }
        )
    ).changes[0]  # offset without colon
    cloud = parse(
        body(
            [
                {
                    **CLOUDEVENTS_SAMPLE[0],
                    "type": "qbo.billpayment.voided.v1",
                    "intuitentityid": "88",
                    "intuitaccountid": "9341452988354102",
                    "time": "2026-12-01T13:10:07.904512331Z",
                }
            ]
        )
    ).changes[0]
    assert (legacy.entity, legacy.operation) == (cloud.entity, cloud.operation) == ("BillPayment", "Void")
    assert legacy.occurred_second == cloud.occurred_second
    assert legacy.occurred_at != cloud.occurred_at


def test_merges_keep_the_merged_id_and_new_entities_their_name() -> None:
    parsed = parse(
        body(
            {
                "eventNotifications": [
                    {
                        "realmId": "123",
                        "dataChangeEvent": {
                            "entities": [
                                {
                                    "name": "Vendor",
                                    "id": "5",
                                    "operation": "Merge",
                                    "deletedId": "9",
                                    "lastUpdated": "2026-12-01T05:10:07Z",
                                },
                                {
                                    "name": "ProjectTask",
                                    "id": "3",
                                    "operation": "Create",
                                    "lastUpdated": "2026-12-01T05:10:07Z",
                                },
                            ]
                        },
                    }
                ]
            }
        )
    )
    assert [(c.entity, c.deleted_id) for c in parsed.changes] == [("Vendor", "9"), ("ProjectTask", None)]


def test_what_cannot_be_read_is_counted_by_reason() -> None:
    event = CLOUDEVENTS_SAMPLE[0]
    parsed = parse(
        body(
            [
                {k: v for k, v in event.items() if k != "intuitaccountid"},  # no company
                {**event, "intuitaccountid": None, "realmid": "4620816365"},  # the realm elsewhere
                {**event, "type": "qbo.account.archived.v1"},  # a verb with no Intuit spelling
                {**event, "type": "com.example.other"},
                {**event, "time": None},
                {**event, "intuitaccountid": "../../etc"},
                {**event, "specversion": "0.3"},
                "not an event",
            ]
        )
    )
    assert [c.realm_id for c in parsed.changes] == ["4620816365"]
    assert parsed.rejected == {"unplaced": 2, "unsupported_type": 2, "malformed": 3}
    assert parse(b"\xff\xfe").rejected == {"unreadable": 1}
    assert parse(b"[" * 100_000).rejected == {"unreadable": 1}
    past_the_end = parse(body([{**event, "time": "9999-12-31T23:59:59-05:00"}]))
    assert past_the_end.rejected == {"malformed": 1}
    assert parse(b'{"something": "else"}').rejected == {"unreadable": 1}
    legacy = parse(
        body(
            {
                "eventNotifications": [
                    {
                        "realmId": "123",
                        "dataChangeEvent": {
                            "entities": [
                                {
                                    "name": "Invoice",
                                    "id": "1",
                                    "operation": "Explode",
                                    "lastUpdated": "2026-12-01T05:10:07Z",
                                },
                                {"name": "Invoice", "id": "2", "operation": "Create"},
                            ]
                        },
                    },
                    {
                        "dataChangeEvent": {
                            "entities": [
                                {
                                    "name": "Invoice",
                                    "id": "3",
                                    "operation": "Create",
                                    "lastUpdated": "2026-12-01T05:10:07Z",
                                }
                            ]
                        }
                    },
                ]
            }
        )
    )
    assert legacy.changes == [] and legacy.rejected == {"malformed": 2, "unplaced": 1}


def test_a_single_cloudevent_outside_an_array_is_read_too() -> None:
    assert len(parse(body(CLOUDEVENTS_SAMPLE[0])).changes) == 1


def test_signatures_verify_under_any_configured_token_only() -> None:
    payload = body(LEGACY_SAMPLE)
    signature = base64.b64encode(hmac.new(b"old", payload, hashlib.sha256).digest()).decode()
    assert verify(signature, payload, ["new", "old"])
    assert not verify(signature, payload, ["new"])
    assert not verify(signature, payload + b" ", ["new", "old"])
    assert not verify(signature, payload, [])
    assert not verify(None, payload, ["old"])
    assert not verify("A" * 500, payload, ["old"])
