"""Intuit's two webhook payload formats, read into one list of entity changes.

- legacy: `{"eventNotifications": [{"realmId", "dataChangeEvent": {"entities": [{"name", "id",
  "operation", "lastUpdated", "deletedId"?}]}}]}`;
- CloudEvents 1.0: a JSON array of `{"specversion": "1.0", "id", "source", "type":
  "qbo.invoice.created.v1", "time", "intuitentityid", "intuitaccountid", "data"}`. The company
  is read from `intuitaccountid` (Intuit's published sample carries the realm id there), or a
  `realmid` extension attribute; an event without either is counted as `unplaced`, not guessed.

Parsing is pure: no I/O. What cannot be read is reported by reason (`Rejected`), never raised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Intuit's entity names, by the lower-case form CloudEvents types carry (qbo.<entity>.<verb>.v1).
ENTITIES: dict[str, str] = {
    name.lower(): name
    for name in (
        "Account",
        "Attachable",
        "Bill",
        "BillPayment",
        "Budget",
        "Class",
        "CreditMemo",
        "Currency",
        "Customer",
        "Department",
        "Deposit",
        "Employee",
        "Estimate",
        "Invoice",
        "Item",
        "JournalCode",
        "JournalEntry",
        "Payment",
        "PaymentMethod",
        "Preferences",
        "Purchase",
        "PurchaseOrder",
        "RefundReceipt",
        "SalesReceipt",
        "TaxAgency",
        "Term",
        "TimeActivity",
        "Transfer",
        "Vendor",
        "VendorCredit",
    )
}
# CloudEvents verbs and the legacy format's operations, which the events carry.
OPERATIONS: dict[str, str] = {
    "created": "Create",
    "updated": "Update",
    "deleted": "Delete",
    "merged": "Merge",
    "voided": "Void",
    "emailed": "Emailed",
}
_LEGACY_OPERATIONS = frozenset(OPERATIONS.values())
_REALM = re.compile(r"^\d{1,32}$")
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TYPE = re.compile(r"^qbo\.([a-z]{1,40})\.([a-z]{1,20})\.v\d{1,3}$")


@dataclass(frozen=True)
class EntityChange:
    realm_id: str
    entity: str  # Intuit's name: "Invoice"
    entity_id: str
    operation: str  # Intuit's verb: "Create", "Update", "Delete", "Merge", "Void", "Emailed"
    occurred_at: datetime  # aware, UTC
    deleted_id: str | None = None  # legacy Merge: the entity merged into this one

    @property
    def occurred_second(self) -> datetime:
        """The dedupe key's time: Intuit's formats stamp one change to different precisions
        (seconds, milliseconds, nanoseconds), so the key keeps whole seconds."""
        return self.occurred_at.replace(microsecond=0)


@dataclass(frozen=True)
class Parsed:
    changes: list[EntityChange]
    # Parts that could not be read, by reason: "malformed", "unplaced" (no company), ...
    rejected: dict[str, int]


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time (any precision; no offset read as UTC), in UTC."""
    if not isinstance(value, str) or not 10 <= len(value) <= 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: a year-9999 time moved past UTC's end
        return None


def _text(value: Any, pattern: re.Pattern[str]) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and pattern.match(value) else None


def parse(body: bytes) -> Parsed:
    """The entity changes in a notification body, in either format."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return Parsed([], {"unreadable": 1})
    if isinstance(document, dict) and "eventNotifications" in document:
        return _legacy(document["eventNotifications"])
    if isinstance(document, list):
        return _cloudevents(document)
    if isinstance(document, dict) and "specversion" in document:  # a single CloudEvent
        return _cloudevents([document])
    return Parsed([], {"unreadable": 1})


def _legacy(notifications: Any) -> Parsed:
    changes: list[EntityChange] = []
    rejected: dict[str, int] = {}

    def reject(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    if not isinstance(notifications, list):
        return Parsed([], {"unreadable": 1})
    for notification in notifications:
        if not isinstance(notification, dict):
            reject("malformed")
            continue
        event = notification.get("dataChangeEvent")
        entities = event.get("entities") if isinstance(event, dict) else None
        if not isinstance(entities, list):
            reject("malformed")
            continue
        realm = _text(notification.get("realmId"), _REALM)
        for raw in entities:
            if realm is None:
                reject("unplaced")
                continue
            change = _legacy_change(realm, raw)
            if change is None:
                reject("malformed")
            else:
                changes.append(change)
    return Parsed(changes, rejected)


def _legacy_change(realm: str, raw: Any) -> EntityChange | None:
    if not isinstance(raw, dict):
        return None
    name = raw.get("name")
    entity = ENTITIES.get(name.lower()) if isinstance(name, str) else None
    if entity is None and isinstance(name, str) and re.fullmatch(r"[A-Z][A-Za-z]{0,39}", name):
        entity = name  # an entity Intuit added since: its own spelling
    entity_id = _text(raw.get("id"), _ID)
    operation = raw.get("operation")
    occurred = parse_time(raw.get("lastUpdated"))
    if entity is None or entity_id is None or operation not in _LEGACY_OPERATIONS or occurred is None:
        return None
    deleted = _text(raw.get("deletedId"), _ID)
    return EntityChange(realm, entity, entity_id, str(operation), occurred, deleted)


def _cloudevents(events: list[Any]) -> Parsed:
    changes: list[EntityChange] = []
    rejected: dict[str, int] = {}
    for raw in events:
        change, reason = _cloudevent(raw)
        if change is not None:
            changes.append(change)
        else:
            rejected[reason] = rejected.get(reason, 0) + 1
    return Parsed(changes, rejected)


def _cloudevent(raw: Any) -> tuple[EntityChange | None, str]:
    if not isinstance(raw, dict) or raw.get("specversion") != "1.0":
        return None, "malformed"
    kind = _TYPE.match(raw.get("type") or "") if isinstance(raw.get("type"), str) else None
    if kind is None:
        return None, "unsupported_type"
    entity = ENTITIES.get(kind.group(1))
    operation = OPERATIONS.get(kind.group(2))
    if entity is None or operation is None:
        # A name or verb Intuit's lower-case type does not let us spell as Intuit does.
        return None, "unsupported_type"
    entity_id = _text(raw.get("intuitentityid"), _ID)
    occurred = parse_time(raw.get("time"))
    if entity_id is None or occurred is None:
        return None, "malformed"
    realm = _text(raw.get("intuitaccountid"), _REALM) or _text(raw.get("realmid"), _REALM)
    if realm is None:
        return None, "unplaced"
    return EntityChange(realm, entity, entity_id, operation, occurred), ""
