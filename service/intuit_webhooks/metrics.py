"""Prometheus metrics of Intuit's webhooks, defined once per process."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

NOTIFICATIONS_RECEIVED = Counter(
    "qbo_broker_intuit_webhook_requests_total",
    "POSTs to /intuit/webhooks by outcome: accepted, missing_signature, bad_signature, "
    "too_large, not_configured",
    ["outcome"],
)
ENTITY_CHANGES = Counter(
    "qbo_broker_intuit_entity_changes_total",
    "Entity changes in Intuit's notifications by outcome: emitted, duplicate, unknown_realm "
    "(a company no live connection holds), stale, and parts dropped as unreadable, malformed, "
    "unplaced (no company) or unsupported_type",
    ["outcome"],
)
NOTIFICATIONS_SET_ASIDE = Counter(
    "qbo_broker_intuit_notifications_set_aside_total",
    "Notifications whose processing failed too often; kept with last_error, not retried",
)
PROCESSING_LAG = Histogram(
    "qbo_broker_intuit_notification_lag_seconds",
    "From a notification's receipt to the commit of its events",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
