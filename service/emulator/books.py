"""Each company's books behind the Accounting API: entities, their versions and a change log.

A `Ledger` per realm holds Customer, Item, Account, Invoice and Attachable entities as the
JSON documents QuickBooks Online returns, with `Id` (a per-type sequence), `SyncToken` (bumped
on every change) and `MetaData`. `Books` applies create / update (full or sparse) / delete /
void / send with QuickBooks' validation and error codes, and records every change as a
`Change`: CDC reads them, and `Books.listeners` is where a "data changed" notifier (webhooks)
attaches. Callers hold the store's lock around every call; nothing here awaits.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

_PACIFIC = timezone(timedelta(hours=-7))  # QuickBooks stamps entities in the company's zone
_CHANGES_MAX = 50_000  # change records kept per company (CDC looks back 30 days at most)

# The entities this emulator keeps, by the lower-case name used in URL paths.
ENTITY_PATHS: dict[str, str] = {
    "customer": "Customer",
    "item": "Item",
    "account": "Account",
    "invoice": "Invoice",
    "attachable": "Attachable",
}
ENTITIES: tuple[str, ...] = tuple(ENTITY_PATHS.values())
# Real QuickBooks entities the emulator does not model: a query finds none of them.
EMPTY_ENTITIES = frozenset(
    {
        "Vendor",
        "Employee",
        "Bill",
        "BillPayment",
        "Payment",
        "SalesReceipt",
        "Estimate",
        "CreditMemo",
        "JournalEntry",
        "Purchase",
        "PurchaseOrder",
        "Deposit",
        "Transfer",
        "Class",
        "Department",
        "Term",
        "TaxCode",
        "TaxRate",
        "TaxAgency",
        "PaymentMethod",
        "RefundReceipt",
        "VendorCredit",
        "TimeActivity",
        "Budget",
        "CompanyCurrency",
        "CustomerType",
    }
)
NAME_LISTS = frozenset({"Customer", "Item", "Account"})  # made inactive, never deleted

_SYSTEM = frozenset({"Id", "SyncToken", "MetaData", "domain", "sparse"})
_WRITABLE: dict[str, frozenset[str]] = {
    "Customer": frozenset(
        {
            "DisplayName",
            "Title",
            "GivenName",
            "MiddleName",
            "FamilyName",
            "Suffix",
            "FullyQualifiedName",
            "CompanyName",
            "PrintOnCheckName",
            "Active",
            "PrimaryPhone",
            "AlternatePhone",
            "Mobile",
            "Fax",
            "PrimaryEmailAddr",
            "WebAddr",
            "BillAddr",
            "ShipAddr",
            "OtherAddr",
            "Notes",
            "Job",
            "BillWithParent",
            "ParentRef",
            "Level",
            "Taxable",
            "Balance",
            "BalanceWithJobs",
            "OpenBalanceDate",
            "CurrencyRef",
            "PreferredDeliveryMethod",
            "ResaleNum",
            "SalesTermRef",
            "PaymentMethodRef",
            "DefaultTaxCodeRef",
            "TaxExemptionReasonId",
            "CustomerTypeRef",
            "ARAccountRef",
            "PrimaryTaxIdentifier",
            "SecondaryTaxIdentifier",
            "GSTIN",
            "BusinessNumber",
            "GSTRegistrationType",
            "IsProject",
            "Source",
            "V4IDPseudonym",
            "ClientEntityId",
        }
    ),
    "Item": frozenset(
        {
            "Name",
            "Sku",
            "Description",
            "Active",
            "SubItem",
            "ParentRef",
            "Level",
            "FullyQualifiedName",
            "Taxable",
            "SalesTaxIncluded",
            "UnitPrice",
            "Type",
            "IncomeAccountRef",
            "PurchaseDesc",
            "PurchaseTaxIncluded",
            "PurchaseCost",
            "ExpenseAccountRef",
            "AssetAccountRef",
            "TrackQtyOnHand",
            "QtyOnHand",
            "InvStartDate",
            "SalesTaxCodeRef",
            "PurchaseTaxCodeRef",
            "PrefVendorRef",
            "ReorderPoint",
            "ClassRef",
            "AbatementRate",
            "ReverseChargeRate",
            "ServiceType",
            "ItemCategoryType",
            "TaxClassificationRef",
            "UQCDisplayText",
            "UQCId",
            "Source",
        }
    ),
    "Account": frozenset(
        {
            "Name",
            "AcctNum",
            "Description",
            "Active",
            "SubAccount",
            "ParentRef",
            "FullyQualifiedName",
            "Classification",
            "AccountType",
            "AccountSubType",
            "CurrentBalance",
            "CurrentBalanceWithSubAccounts",
            "CurrencyRef",
            "TaxCodeRef",
            "OpeningBalance",
            "OpeningBalanceDate",
            "AccountAlias",
            "TxnLocationType",
        }
    ),
    "Invoice": frozenset(
        {
            "DocNumber",
            "TxnDate",
            "DueDate",
            "ShipDate",
            "CustomerRef",
            "Line",
            "TotalAmt",
            "Balance",
            "CustomerMemo",
            "PrivateNote",
            "BillEmail",
            "BillEmailCc",
            "BillEmailBcc",
            "BillAddr",
            "ShipAddr",
            "ShipFromAddr",
            "SalesTermRef",
            "EmailStatus",
            "PrintStatus",
            "AllowOnlineCreditCardPayment",
            "AllowOnlineACHPayment",
            "AllowIPNPayment",
            "AllowOnlinePayment",
            "CurrencyRef",
            "ExchangeRate",
            "TxnTaxDetail",
            "ApplyTaxAfterDiscount",
            "ClassRef",
            "DepartmentRef",
            "CustomField",
            "LinkedTxn",
            "Deposit",
            "DepositToAccountRef",
            "GlobalTaxCalculation",
            "HomeBalance",
            "HomeTotalAmt",
            "TrackingNum",
            "ShipMethodRef",
            "TxnSource",
            "TransactionLocationType",
            "InvoiceLink",
            "FreeFormAddress",
            "DeliveryInfo",
            "RecurDataRef",
            "TaxExemptionRef",
            "ProjectRef",
        }
    ),
    "Attachable": frozenset(
        {
            "FileName",
            "Note",
            "Category",
            "ContentType",
            "PlaceName",
            "AttachableRef",
            "Long",
            "Lat",
            "Tag",
            "FileAccessUri",
            "Size",
            "TempDownloadUri",
            "ThumbnailFileAccessUri",
            "ThumbnailTempDownloadUri",
        }
    ),
}
# Fields QuickBooks computes: accepted in a request body and ignored.
_COMPUTED: dict[str, frozenset[str]] = {
    "Customer": frozenset({"FullyQualifiedName", "Balance", "BalanceWithJobs", "Level"}),
    "Item": frozenset({"FullyQualifiedName", "Level"}),
    "Account": frozenset(
        {"FullyQualifiedName", "Classification", "CurrentBalance", "CurrentBalanceWithSubAccounts"}
    ),
    "Invoice": frozenset({"TotalAmt", "Balance", "HomeBalance", "HomeTotalAmt", "InvoiceLink"}),
    "Attachable": frozenset(
        {"FileAccessUri", "Size", "TempDownloadUri", "ThumbnailFileAccessUri", "ThumbnailTempDownloadUri"}
    ),
}

ACCOUNT_TYPES: dict[str, tuple[str, str]] = {  # AccountType -> (Classification, default subtype)
    "Bank": ("Asset", "Checking"),
    "Other Current Asset": ("Asset", "OtherCurrentAssets"),
    "Fixed Asset": ("Asset", "OtherFixedAssets"),
    "Other Asset": ("Asset", "OtherLongTermAssets"),
    "Accounts Receivable": ("Asset", "AccountsReceivable"),
    "Equity": ("Equity", "OwnersEquity"),
    "Expense": ("Expense", "OtherMiscellaneousServiceCost"),
    "Other Expense": ("Expense", "OtherMiscellaneousExpense"),
    "Cost of Goods Sold": ("Expense", "SuppliesMaterialsCogs"),
    "Accounts Payable": ("Liability", "AccountsPayable"),
    "Credit Card": ("Liability", "CreditCard"),
    "Long Term Liability": ("Liability", "OtherLongTermLiabilities"),
    "Other Current Liability": ("Liability", "OtherCurrentLiabilities"),
    "Income": ("Revenue", "SalesOfProductIncome"),
    "Other Income": ("Revenue", "OtherMiscellaneousIncome"),
}
ITEM_TYPES = ("Service", "NonInventory", "Inventory", "Category")
LINE_TYPES = ("SalesItemLineDetail", "SubTotalLineDetail", "DiscountLineDetail", "DescriptionOnly")
_USD = {"value": "USD", "name": "United States Dollar"}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class QboError(Exception):
    """A QuickBooks Fault: `{"Fault": {"Error": [...], "type": ...}}` with an HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: str,
        *,
        status: int = 400,
        kind: str = "ValidationFault",
        element: str = "",
    ) -> None:
        super().__init__(f"{code} {message}: {detail}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status
        self.kind = kind
        self.element = element

    def fault(self) -> dict[str, Any]:
        error = {"Message": self.message, "Detail": self.detail, "code": self.code, "element": self.element}
        return {"Error": [error], "type": self.kind}


def not_found(deleted: bool = False) -> QboError:
    detail = (
        "Object Not Found : Another user has deleted this transaction."
        if deleted
        else "Object Not Found : Something you're trying to use has been made inactive. Check "
        "the fields with accounts, customers, items, vendors or employees."
    )
    return QboError("610", "Object Not Found", detail)


def missing(name: str) -> QboError:
    return QboError(
        "2020",
        "Required param missing, need to supply the required value for the API",
        f"Required parameter {name} is missing in the request",
        element=name,
    )


def unsupported_property(name: str, entity: str) -> QboError:
    return QboError(
        "2010",
        "Request has invalid or unsupported property",
        f'Property Name:Unrecognized field "{name}" (class com.intuit.schema.finance.'
        f"v3.{entity}), not marked as ignorable specified is unsupported or invalid",
        element=name,
    )


def invalid_reference(what: str, value: Any) -> QboError:
    return QboError(
        "2500",
        "Invalid Reference Id",
        f"Invalid Reference Id : {what} assigned to this transaction has been "
        f"deleted or made inactive (Id {value}). Check the fields with accounts, "
        "customers, items, vendors or employees.",
        element=what,
    )


def invalid_enum(value: Any) -> QboError:
    return QboError("2170", "Invalid Enumeration", f"Invalid Enumeration : {value}")


def too_long(name: str, maximum: int, length: int) -> QboError:
    return QboError(
        "2050",
        "String length is either shorter or longer than supported by specification",
        f"String length specified does not match the supported "
        f"length. Min:0 Max:{maximum} supported. Supplied length:{length}",
        element=name,
    )


def unsupported_operation(detail: str) -> QboError:
    return QboError("500", "Unsupported Operation", detail)


def business(detail: str) -> QboError:
    return QboError(
        "6000",
        "A business validation error has occurred while processing your request",
        f"Business Validation Error: {detail}",
    )


def fields_of(entity: str) -> frozenset[str]:
    """Every property an entity may carry."""
    return _WRITABLE[entity] | _SYSTEM


def company_date(timestamp: float) -> date:
    """The calendar day in the company's zone."""
    return datetime.fromtimestamp(timestamp, _PACIFIC).date()


def entity_time(timestamp: float) -> str:
    """MetaData times: seconds and the zone offset, as QuickBooks writes them."""
    return datetime.fromtimestamp(timestamp, _PACIFIC).isoformat(timespec="seconds")


def parse_time(value: str) -> float | None:
    """An ISO 8601 date or date-time; without an offset, the company's zone."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_PACIFIC)
    return parsed.timestamp()


def _money(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise QboError(
            "2010",
            "Request has invalid or unsupported property",
            f"Property Name:{name} specified is unsupported or invalid",
            element=name,
        )
    try:
        return round(float(value), 2)
    except (TypeError, ValueError):
        raise QboError(
            "2010",
            "Request has invalid or unsupported property",
            f"Property Name:{name} specified is unsupported or invalid",
            element=name,
        ) from None


def _ref_value(ref: Any) -> str | None:
    if isinstance(ref, dict) and ref.get("value") not in (None, ""):
        return str(ref["value"])
    return None


def _text(fields: dict[str, Any], name: str, maximum: int) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    value = str(value)
    if len(value) > maximum:
        raise too_long(name, maximum, len(value))
    return value


@dataclass
class Change:
    """One change to one entity: what CDC answers from and what a webhook would announce."""

    realm_id: str
    entity: str  # "Customer", "Invoice", ...
    entity_id: str
    operation: str  # Create, Update, Delete, Void, Emailed
    time: float


@dataclass
class Ledger:
    """One company's entities."""

    realm_id: str
    entities: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in ENTITIES}
    )
    deleted: dict[str, dict[str, float]] = field(default_factory=lambda: {name: {} for name in ENTITIES})
    next_id: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENTITIES, 1))
    next_doc_number: int = 1001
    changes: deque[Change] = field(default_factory=lambda: deque(maxlen=_CHANGES_MAX))

    def live(self, entity: str, entity_id: str | None) -> dict[str, Any] | None:
        return self.entities[entity].get(entity_id) if entity_id is not None else None


class Books:
    """Every company's ledger, created (and seeded) the first time the company is used."""

    def __init__(self, *, seed: bool) -> None:
        self.seed = seed
        self.ledgers: dict[str, Ledger] = {}
        # Called with every Change after it is recorded (webhook delivery hooks in here).
        self.listeners: list[Callable[[Change], None]] = []

    def clear(self) -> None:
        self.ledgers.clear()

    # -- ledgers, seed, persistence -------------------------------------------------------------

    def ledger(self, realm_id: str, created_at: float) -> Ledger:
        ledger = self.ledgers.get(realm_id)
        if ledger is None:
            ledger = self.ledgers[realm_id] = Ledger(realm_id)
            self._seed(ledger, created_at)
        return ledger

    def _seed(self, ledger: Ledger, when: float) -> None:
        """A small chart of accounts and a few items for every company; with the demo seed
        also customers and invoices. Seeding records no changes: it is the company's past."""
        accounts = [
            ("Sales of Product Income", "Income", "SalesOfProductIncome"),
            ("Services", "Income", "ServiceFeeIncome"),
            ("Accounts Receivable (A/R)", "Accounts Receivable", "AccountsReceivable"),
            ("Checking", "Bank", "Checking"),
            ("Inventory Asset", "Other Current Asset", "Inventory"),
            ("Cost of Goods Sold", "Cost of Goods Sold", "SuppliesMaterialsCogs"),
        ]
        for name, kind, subtype in accounts:
            self._insert(
                ledger,
                "Account",
                {"Name": name, "AccountType": kind, "AccountSubType": subtype},
                when,
                record=False,
            )
        items = [
            ("Services", "Service", 0, "2"),
            ("Hours", "Service", 75, "2"),
            ("Scrap Steel (ton)", "NonInventory", 310.5, "1"),
            ("Copper #2 (lb)", "NonInventory", 3.85, "1"),
        ]
        for name, kind, price, income in items:
            self._insert(
                ledger,
                "Item",
                {"Name": name, "Type": kind, "UnitPrice": price, "IncomeAccountRef": {"value": income}},
                when,
                record=False,
            )
        if not self.seed:
            return
        customers = [
            ("Acme Metals", "ap@acme-metals.example"),
            ("Bill's Windsurf Shop", "surf@intuit.example"),
            ("Cool Cars", "cool_cars@intuit.example"),
        ]
        for name, email in customers:
            self._insert(
                ledger,
                "Customer",
                {"DisplayName": name, "PrimaryEmailAddr": {"Address": email}},
                when,
                record=False,
            )
        invoices = [("1", [("3", 2, 310.5), ("2", 4, 75)]), ("2", [("4", 500, 3.85)])]
        for customer, lines in invoices:
            self._insert(
                ledger,
                "Invoice",
                {
                    "CustomerRef": {"value": customer},
                    "Line": [
                        {
                            "Amount": round(qty * price, 2),
                            "DetailType": "SalesItemLineDetail",
                            "SalesItemLineDetail": {
                                "ItemRef": {"value": item},
                                "Qty": qty,
                                "UnitPrice": price,
                            },
                        }
                        for item, qty, price in lines
                    ],
                },
                when,
                record=False,
            )

    def dump(self) -> dict[str, Any]:
        return {
            realm: {
                "entities": ledger.entities,
                "deleted": ledger.deleted,
                "next_id": ledger.next_id,
                "next_doc_number": ledger.next_doc_number,
                "changes": [asdict(c) for c in ledger.changes],
            }
            for realm, ledger in self.ledgers.items()
        }

    def load(self, document: dict[str, Any] | None) -> None:
        self.ledgers.clear()
        for realm, raw in (document or {}).items():
            ledger = Ledger(realm)
            for name in ENTITIES:
                ledger.entities[name] = dict(raw.get("entities", {}).get(name, {}))
                ledger.deleted[name] = dict(raw.get("deleted", {}).get(name, {}))
                ledger.next_id[name] = int(raw.get("next_id", {}).get(name, 1))
            ledger.next_doc_number = int(raw.get("next_doc_number", 1001))
            ledger.changes.extend(Change(**c) for c in raw.get("changes", []))
            self.ledgers[realm] = ledger

    # -- operations -----------------------------------------------------------------------------

    def read(self, ledger: Ledger, entity: str, entity_id: str) -> dict[str, Any]:
        found = ledger.live(entity, entity_id)
        if found is None:
            raise not_found(deleted=entity_id in ledger.deleted[entity])
        return found

    def create(self, ledger: Ledger, entity: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        self._check_properties(entity, body)
        return self._insert(ledger, entity, body, now)

    def update(self, ledger: Ledger, entity: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        self._check_properties(entity, body)
        current = self._current(ledger, entity, body)
        if body.get("sparse") is True:
            fields = {k: v for k, v in current.items() if k not in _SYSTEM}
            fields.update({k: v for k, v in body.items() if k not in _SYSTEM})
        else:
            # A full update: writable fields left out of the body are cleared.
            fields = {k: v for k, v in body.items() if k not in _SYSTEM}
            if entity == "Invoice" and "DocNumber" not in fields:
                fields["DocNumber"] = current.get("DocNumber")
        built = self._build(ledger, entity, fields, now, current["Id"])
        return self._store(ledger, entity, built, current, now, "Update")

    def delete(self, ledger: Ledger, entity: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        if entity in NAME_LISTS:
            raise unsupported_operation("Operation Delete is not supported.")
        current = self._current(ledger, entity, body)
        del ledger.entities[entity][current["Id"]]
        ledger.deleted[entity][current["Id"]] = now
        self._record(ledger, entity, current["Id"], "Delete", now)
        return {"status": "Deleted", "domain": "QBO", "Id": current["Id"]}

    def void(self, ledger: Ledger, entity: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        if entity != "Invoice":
            raise unsupported_operation("Operation Void is not supported.")
        current = self._current(ledger, entity, body)
        voided = copy.deepcopy({k: v for k, v in current.items() if k not in _SYSTEM})
        for line in voided.get("Line", []):
            line["Amount"] = 0
            detail = line.get("SalesItemLineDetail")
            if isinstance(detail, dict):
                detail["Qty"] = 0
        voided["TotalAmt"] = 0
        voided["Balance"] = 0
        voided["PrivateNote"] = "Voided"
        return self._store(ledger, entity, voided, current, now, "Void")

    def send(self, ledger: Ledger, entity_id: str, send_to: str | None, now: float) -> dict[str, Any]:
        current = self.read(ledger, "Invoice", entity_id)
        address = send_to or (current.get("BillEmail") or {}).get("Address")
        if not address:
            raise business("Please enter an email address in the To: field.")
        if not _EMAIL.match(address):
            raise QboError(
                "2210",
                "Invalid Email Address format",
                "Email Address does not conform to the syntax rules of RFC 822.",
            )
        sent = {k: v for k, v in current.items() if k not in _SYSTEM}
        sent["EmailStatus"] = "EmailSent"
        sent["BillEmail"] = {"Address": address}
        sent["DeliveryInfo"] = {"DeliveryType": "Email", "DeliveryTime": entity_time(now)}
        return self._store(ledger, "Invoice", sent, current, now, "Emailed")

    def changes_since(
        self, ledger: Ledger, entities: Iterable[str], since: float
    ) -> dict[str, list[dict[str, Any]]]:
        """Per entity, what changed at or after `since`: the entity as it is now, or a
        `"status": "Deleted"` stub, each once, oldest change first."""
        wanted = set(entities)
        seen: dict[str, dict[str, float]] = {name: {} for name in wanted}
        for change in ledger.changes:
            if change.entity in wanted and change.time >= since:
                seen[change.entity].pop(change.entity_id, None)
                seen[change.entity][change.entity_id] = change.time
        answer: dict[str, list[dict[str, Any]]] = {}
        for name in wanted:
            rows = []
            for entity_id, when in seen[name].items():
                live = ledger.live(name, entity_id)
                if live is not None:
                    rows.append(live)
                else:
                    rows.append(
                        {
                            "domain": "QBO",
                            "status": "Deleted",
                            "Id": entity_id,
                            "MetaData": {"LastUpdatedTime": entity_time(when)},
                        }
                    )
            answer[name] = rows
        return answer

    # -- internals ------------------------------------------------------------------------------

    def _check_properties(self, entity: str, body: dict[str, Any]) -> None:
        allowed = _WRITABLE[entity] | _SYSTEM
        for name in body:
            if name not in allowed:
                raise unsupported_property(name, entity)

    def _current(self, ledger: Ledger, entity: str, body: dict[str, Any]) -> dict[str, Any]:
        entity_id = body.get("Id")
        if entity_id in (None, ""):
            raise missing("Id")
        entity_id = str(entity_id)
        current = ledger.live(entity, entity_id)
        if current is None:
            raise not_found(deleted=entity_id in ledger.deleted[entity])
        token = body.get("SyncToken")
        if token in (None, ""):
            raise missing("SyncToken")
        if str(token) != current["SyncToken"]:
            raise QboError(
                "5010",
                "Stale Object Error",
                "Stale Object Error : You and root "
                "were working on this at the same time. root finished before you "
                "did, so your work was not saved.",
            )
        return current

    def _insert(
        self, ledger: Ledger, entity: str, body: dict[str, Any], now: float, *, record: bool = True
    ) -> dict[str, Any]:
        fields = {k: v for k, v in body.items() if k not in _SYSTEM}
        built = self._build(ledger, entity, fields, now, None)
        entity_id = str(ledger.next_id[entity])
        ledger.next_id[entity] += 1
        stamp = entity_time(now)
        document = {
            **built,
            "domain": "QBO",
            "sparse": False,
            "Id": entity_id,
            "SyncToken": "0",
            "MetaData": {"CreateTime": stamp, "LastUpdatedTime": stamp},
        }
        ledger.entities[entity][entity_id] = document
        if entity == "Invoice" and "DocNumber" not in body:
            ledger.next_doc_number += 1
        if record:
            self._record(ledger, entity, entity_id, "Create", now)
        return document

    def _store(
        self,
        ledger: Ledger,
        entity: str,
        built: dict[str, Any],
        current: dict[str, Any],
        now: float,
        operation: str,
    ) -> dict[str, Any]:
        document = {
            **built,
            "domain": "QBO",
            "sparse": False,
            "Id": current["Id"],
            "SyncToken": str(int(current["SyncToken"]) + 1),
            "MetaData": {
                "CreateTime": current["MetaData"]["CreateTime"],
                "LastUpdatedTime": entity_time(now),
            },
        }
        ledger.entities[entity][current["Id"]] = document
        self._record(ledger, entity, current["Id"], operation, now)
        return document

    def _record(self, ledger: Ledger, entity: str, entity_id: str, operation: str, now: float) -> None:
        change = Change(ledger.realm_id, entity, entity_id, operation, now)
        ledger.changes.append(change)
        for listener in list(self.listeners):
            listener(change)

    def _build(
        self, ledger: Ledger, entity: str, fields: dict[str, Any], now: float, own_id: str | None
    ) -> dict[str, Any]:
        fields = {k: v for k, v in fields.items() if k not in _COMPUTED[entity] and v is not None}
        builder = {
            "Customer": self._customer,
            "Item": self._item,
            "Account": self._account,
            "Invoice": self._invoice,
            "Attachable": self._attachable,
        }[entity]
        return builder(ledger, fields, now, own_id)

    @staticmethod
    def _unique(ledger: Ledger, entity: str, key: str, value: str, own_id: str | None, detail: str) -> None:
        folded = value.casefold()
        for other_id, other in ledger.entities[entity].items():
            if other_id != own_id and str(other.get(key, "")).casefold() == folded:
                raise QboError(
                    "6240",
                    "Duplicate Name Exists Error",
                    f"The name supplied already exists. : {detail}",
                    element=key,
                )

    def _customer(
        self, ledger: Ledger, fields: dict[str, Any], now: float, own_id: str | None
    ) -> dict[str, Any]:
        name = _text(fields, "DisplayName", 500)
        if not name:
            parts = [
                str(fields[k])
                for k in ("Title", "GivenName", "MiddleName", "FamilyName", "Suffix")
                if fields.get(k)
            ]
            if not parts:
                raise QboError(
                    "6080",
                    "No Name Provided",
                    "Title, GivenName, MiddleName, "
                    "FamilyName, DisplayName, Suffix - one of these must be non-empty",
                )
            name = " ".join(parts)
        if ":" in name:
            raise business("The name of a customer cannot contain a colon (:).")
        self._unique(
            ledger,
            "Customer",
            "DisplayName",
            name,
            own_id,
            "Another customer, vendor or employee is already using this name. Please use a different name.",
        )
        email = fields.get("PrimaryEmailAddr")
        if email is not None:
            address = email.get("Address") if isinstance(email, dict) else None
            if address and not _EMAIL.match(str(address)):
                raise QboError(
                    "2210",
                    "Invalid Email Address format",
                    "Email Address does not conform to the syntax rules of RFC 822.",
                )
        built = {
            "Taxable": False,
            "Job": False,
            "BillWithParent": False,
            "Balance": 0,
            "BalanceWithJobs": 0,
            "CurrencyRef": dict(_USD),
            "PreferredDeliveryMethod": "Print",
            "IsProject": False,
            "Active": True,
        }
        built.update(fields)
        built.update(
            DisplayName=name, FullyQualifiedName=name, PrintOnCheckName=fields.get("PrintOnCheckName", name)
        )
        return built

    def _item(self, ledger: Ledger, fields: dict[str, Any], now: float, own_id: str | None) -> dict[str, Any]:
        name = _text(fields, "Name", 100)
        if not name:
            raise missing("Name")
        self._unique(
            ledger,
            "Item",
            "Name",
            name,
            own_id,
            "Another product or service is already using this name. Please use a different name.",
        )
        kind = fields.get("Type", "Service")
        if kind not in ITEM_TYPES:
            raise invalid_enum(kind)
        refs = {
            "Service": ("IncomeAccountRef",),
            "NonInventory": ("IncomeAccountRef",),
            "Inventory": ("IncomeAccountRef", "AssetAccountRef", "ExpenseAccountRef"),
            "Category": (),
        }[kind]
        for ref in refs:
            value = _ref_value(fields.get(ref))
            if value is None:
                raise missing(ref)
            account = ledger.live("Account", value)
            if account is None or account.get("Active") is False:
                raise invalid_reference(ref, value)
            fields[ref] = {"value": value, "name": account["Name"]}
        if kind == "Inventory":
            for required in ("QtyOnHand", "InvStartDate"):
                if required not in fields:
                    raise missing(required)
        built: dict[str, Any] = {
            "Active": True,
            "Taxable": False,
            "SalesTaxIncluded": False,
            "UnitPrice": 0,
            "PurchaseCost": 0,
            "PurchaseTaxIncluded": False,
            "TrackQtyOnHand": kind == "Inventory",
            "Type": kind,
        }
        built.update(fields)
        built["UnitPrice"] = _money(built["UnitPrice"], "UnitPrice")
        built.update(Name=name, FullyQualifiedName=name)
        return built

    def _account(
        self, ledger: Ledger, fields: dict[str, Any], now: float, own_id: str | None
    ) -> dict[str, Any]:
        name = _text(fields, "Name", 100)
        if not name:
            raise missing("Name")
        if ":" in name or '"' in name:
            raise business('The account name cannot contain a colon (:) or a double quote (").')
        self._unique(
            ledger,
            "Account",
            "Name",
            name,
            own_id,
            "Another account is already using this name. Please use a different name.",
        )
        kind = fields.get("AccountType")
        if kind is None:
            raise business("Either an Account.AccountType or an Account.AccountSubType must be specified")
        if kind not in ACCOUNT_TYPES:
            raise invalid_enum(kind)
        classification, subtype = ACCOUNT_TYPES[kind]
        built: dict[str, Any] = {
            "SubAccount": False,
            "Active": True,
            "CurrentBalance": 0,
            "CurrentBalanceWithSubAccounts": 0,
            "CurrencyRef": dict(_USD),
            "AccountSubType": subtype,
        }
        built.update(fields)
        built.update(Name=name, FullyQualifiedName=name, Classification=classification)
        return built

    def _invoice(
        self, ledger: Ledger, fields: dict[str, Any], now: float, own_id: str | None
    ) -> dict[str, Any]:
        customer_id = _ref_value(fields.get("CustomerRef"))
        if customer_id is None:
            raise missing("CustomerRef")
        customer = ledger.live("Customer", customer_id)
        if customer is None or customer.get("Active") is False:
            raise invalid_reference("CustomerRef", customer_id)
        lines = fields.get("Line")
        if not isinstance(lines, list) or not lines:
            raise missing("Line")
        built_lines: list[dict[str, Any]] = []
        subtotal = 0.0
        discount = 0.0
        for raw in lines:
            if not isinstance(raw, dict):
                raise missing("Line.DetailType")
            detail_type = raw.get("DetailType")
            if detail_type is None:
                raise missing("Line.DetailType")
            if detail_type not in LINE_TYPES:
                raise invalid_enum(detail_type)
            if detail_type == "SubTotalLineDetail":
                continue  # QuickBooks computes the subtotal line itself
            line = dict(raw)
            if detail_type == "SalesItemLineDetail":
                if "Amount" not in line:
                    raise missing("Line.Amount")
                amount = _money(line["Amount"], "Amount")
                detail = dict(line.get("SalesItemLineDetail") or {})
                item_id = _ref_value(detail.get("ItemRef")) or "1"
                item = ledger.live("Item", item_id)
                if item is None or item.get("Active") is False:
                    raise invalid_reference("ItemRef", item_id)
                detail["ItemRef"] = {"value": item_id, "name": item["Name"]}
                if "Qty" in detail and "UnitPrice" in detail:
                    expected = round(_money(detail["Qty"], "Qty") * float(detail["UnitPrice"]), 2)
                    if abs(expected - amount) > 0.005:
                        raise QboError(
                            "6070",
                            "Amount calculation incorrect in the request",
                            f"Amount is not equal to UnitPrice * Qty. Supplied value:{amount}",
                        )
                detail.setdefault("TaxCodeRef", {"value": "NON"})
                line.update(Amount=amount, SalesItemLineDetail=detail)
                subtotal += amount
            elif detail_type == "DiscountLineDetail":
                detail = dict(line.get("DiscountLineDetail") or {})
                if detail.get("PercentBased") and "DiscountPercent" in detail:
                    amount = round(subtotal * float(detail["DiscountPercent"]) / 100, 2)
                elif "Amount" in line:
                    amount = _money(line["Amount"], "Amount")
                else:
                    raise QboError(
                        "6090",
                        "Discount Line missing required info.",
                        "Discount amount or percent should be provided.",
                    )
                line.update(Amount=amount, DiscountLineDetail=detail)
                discount += amount
            else:
                line["Amount"] = _money(line.get("Amount", 0), "Amount")
            built_lines.append(line)
        numbered = []
        for index, line in enumerate(built_lines, start=1):
            numbered.append(
                {
                    "Id": str(index),
                    "LineNum": index,
                    **{k: v for k, v in line.items() if k not in ("Id", "LineNum")},
                }
            )
        total = round(subtotal - discount, 2)
        numbered.append(
            {"Amount": round(subtotal, 2), "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}}
        )
        doc_number = _text(fields, "DocNumber", 21)
        if doc_number is None:
            doc_number = str(ledger.next_doc_number)
        txn_date = fields.get("TxnDate") or company_date(now).isoformat()
        built: dict[str, Any] = {
            "AllowIPNPayment": False,
            "AllowOnlinePayment": False,
            "AllowOnlineCreditCardPayment": False,
            "AllowOnlineACHPayment": False,
            "CustomField": [],
            "LinkedTxn": [],
            "TxnTaxDetail": {"TotalTax": 0},
            "CurrencyRef": dict(_USD),
            "EmailStatus": "NotSet",
            "PrintStatus": "NotSet",
            "ApplyTaxAfterDiscount": False,
            "DueDate": txn_date,
        }
        built.update(fields)
        built.update(
            DocNumber=doc_number,
            TxnDate=txn_date,
            Line=numbered,
            TotalAmt=total,
            Balance=total,
            CustomerRef={"value": customer_id, "name": customer["DisplayName"]},
        )
        return built

    def _attachable(
        self, ledger: Ledger, fields: dict[str, Any], now: float, own_id: str | None
    ) -> dict[str, Any]:
        if not fields.get("FileName") and not fields.get("Note"):
            raise missing("FileName")
        _text(fields, "FileName", 1000)
        _text(fields, "Note", 2000)
        refs = fields.get("AttachableRef") or []
        if not isinstance(refs, list):
            refs = [refs]
        for ref in refs:
            entity_ref = ref.get("EntityRef") if isinstance(ref, dict) else None
            kind = str((entity_ref or {}).get("type", ""))
            value = _ref_value(entity_ref)
            canonical = next((e for e in ENTITIES if e.lower() == kind.lower()), None)
            if canonical is None or value is None:
                raise QboError(
                    "6050",
                    "The entity reference type is unsupported for Attachable",
                    f"The entity reference type {kind or '(none)'} is unsupported for Attachable",
                )
            if ledger.live(canonical, value) is None:
                raise invalid_reference("AttachableRef.EntityRef", value)
        return {**fields, "AttachableRef": refs}
