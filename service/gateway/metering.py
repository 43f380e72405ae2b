"""The metering interface the QuickBooks gateway calls: classify a call, admit it (the tenant's
CorePlus cap), record it once per request that reached Intuit. Implemented in service.metering,
below the runtime that holds the process's one Meter (`Runtime.meter`)."""

from service.metering.meter import (
    CallClass,
    Meter,
    QuickBooksBudgetExhausted,
    classify,
    outcome_for_status,
)

__all__ = ["CallClass", "Meter", "QuickBooksBudgetExhausted", "classify", "outcome_for_status"]
