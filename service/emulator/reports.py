"""Generated reports for `GET …/reports/{name}`: large, deterministic and produced lazily.

Rows are synthetic (they do not add up the company's invoices): the point is a report shaped
like QuickBooks' (`Header`, `Columns`, `Rows` of sections with `ColData` and a `Summary`) whose
size is set by the `report_rows` knob, so a client can be tested against multi-megabyte
answers. The same name, dates and size give the same rows every time; the answer is built one
section at a time so it can be streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

SUMMARY_REPORTS = frozenset(
    {
        "ProfitAndLoss",
        "BalanceSheet",
        "TrialBalance",
        "CashFlow",
        "AgedReceivables",
        "AgedPayables",
        "CustomerBalance",
        "CustomerIncome",
        "CustomerSales",
        "ItemSales",
        "DepartmentSales",
        "ClassSales",
        "VendorBalance",
        "VendorExpenses",
        "AccountList",
        "InventoryValuationSummary",
    }
)
DETAIL_REPORTS = frozenset(
    {
        "GeneralLedger",
        "ProfitAndLossDetail",
        "TransactionList",
        "TransactionListWithSplits",
        "TransactionListByCustomer",
        "TransactionListByVendor",
        "AgedReceivableDetail",
        "AgedPayableDetail",
        "CustomerBalanceDetail",
        "VendorBalanceDetail",
        "JournalReport",
        "InventoryValuationDetail",
    }
)
REPORTS = SUMMARY_REPORTS | DETAIL_REPORTS
SECTION_ROWS = 50
_GROUPS = ("Income", "COGS", "Expenses", "OtherIncome", "OtherExpenses")
_TXN_TYPES = ("Invoice", "Payment", "Bill", "Bill Payment (Check)", "Journal Entry", "Deposit")


def _amount(index: int) -> float:
    return ((index * 7919 + 104729) % 2_500_000) / 100


def _period(params: dict[str, str], today: date) -> tuple[date, date, bool]:
    """The report's period: start_date/end_date if valid, else this calendar year to date."""

    def parsed(name: str) -> date | None:
        try:
            return date.fromisoformat(params[name]) if params.get(name) else None
        except ValueError:
            return None

    start, end = parsed("start_date"), parsed("end_date")
    explicit = start is not None or end is not None
    end = end or today
    start = start or date(end.year, 1, 1)
    if start > end:
        start, end = end, start
    return start, end, explicit


def header(name: str, params: dict[str, str], today: date, time_stamp: str, rows: int) -> dict[str, Any]:
    start, end, explicit = _period(params, today)
    basis = "Cash" if params.get("accounting_method", "").lower() == "cash" else "Accrual"
    head: dict[str, Any] = {
        "Time": time_stamp,
        "ReportName": name,
        "ReportBasis": basis,
        "StartPeriod": start.isoformat(),
        "EndPeriod": end.isoformat(),
        "SummarizeColumnsBy": "Total",
        "Currency": "USD",
        "Option": [
            {"Name": "AccrualBasis", "Value": "true" if basis == "Accrual" else "false"},
            {"Name": "NoReportData", "Value": "false" if rows else "true"},
        ],
    }
    if not explicit:
        head["DateMacro"] = "this calendar year-to-date"
    return head


def columns(name: str) -> dict[str, Any]:
    if name in DETAIL_REPORTS:
        spec = [
            ("Date", "tx_date", "Date"),
            ("Transaction Type", "txn_type", "String"),
            ("Num", "doc_num", "String"),
            ("Name", "name", "String"),
            ("Memo/Description", "memo", "String"),
            ("Split", "split_acc", "String"),
            ("Amount", "subt_nat_amount", "Money"),
            ("Balance", "rbal_nat_amount", "Money"),
        ]
    else:
        spec = [("", "account", "Account"), ("Total", "total", "Money")]
    return {
        "Column": [
            {"ColTitle": title, "ColType": kind, "MetaData": [{"Name": "ColKey", "Value": key}]}
            for title, key, kind in spec
        ]
    }


def sections(name: str, params: dict[str, str], today: date, rows: int) -> Iterator[dict[str, Any]]:
    """The report's top-level rows, SECTION_ROWS data rows per section."""
    start, end, _ = _period(params, today)
    days = (end - start).days + 1
    detail = name in DETAIL_REPORTS
    grand = 0.0
    for first in range(0, rows, SECTION_ROWS):
        number = first // SECTION_ROWS
        group = _GROUPS[number % len(_GROUPS)]
        account = f"{group} account {number + 1:05d}"
        data: list[dict[str, Any]] = []
        running = 0.0
        for index in range(first, min(rows, first + SECTION_ROWS)):
            amount = _amount(index)
            running = round(running + amount, 2)
            if detail:
                day = start + timedelta(days=index % days)
                kind = _TXN_TYPES[index % len(_TXN_TYPES)]
                cells = [
                    {"value": day.isoformat()},
                    {"value": kind, "id": str(index + 1)},
                    {"value": str(1001 + index)},
                    {"value": f"Customer {index % 997:04d}", "id": str(index % 997 + 1)},
                    {"value": f"{kind} {index + 1} for scrap metal, lot {index % 89:02d}"},
                    {"value": "Accounts Receivable (A/R)", "id": "3"},
                    {"value": f"{amount:.2f}"},
                    {"value": f"{running:.2f}"},
                ]
            else:
                cells = [
                    {"value": f"{group} line {index + 1:07d}", "id": str(index + 1)},
                    {"value": f"{amount:.2f}"},
                ]
            data.append({"ColData": cells, "type": "Data"})
        grand = round(grand + running, 2)
        blanks = [{"value": ""}] * (6 if detail else 0)
        yield {
            "Header": {"ColData": [{"value": account, "id": str(number + 1)}, {"value": ""}, *blanks]},
            "Rows": {"Row": data},
            "Summary": {
                "ColData": [{"value": f"Total for {account}"}, *blanks, {"value": f"{running:.2f}"}]
                if detail
                else [{"value": f"Total for {account}"}, {"value": f"{running:.2f}"}]
            },
            "type": "Section",
            "group": group,
        }
    if rows:
        cells = [{"value": "TOTAL"}, *([{"value": ""}] * 6 if detail else []), {"value": f"{grand:.2f}"}]
        yield {"Summary": {"ColData": cells}, "type": "Section", "group": "GrandTotal"}
