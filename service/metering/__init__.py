"""Metering of Accounting API calls: Intuit's class of each call, durable counts per tenant, realm,
class and UTC month, the tenants' CorePlus caps and the app's budget thresholds."""
