"""Prometheus metrics, defined once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "qbo_broker_http_requests_total", "HTTP requests served", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "qbo_broker_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DIRECT_ANSWERS = Counter(
    "qbo_broker_direct_answers_total",
    "Requests answered by a direct route: a documented GET endpoint's plain form, served without "
    "FastAPI's dependency solving (service.core.routing)",
    ["route"],
)
INTUIT_CALLS = Counter("qbo_broker_intuit_calls_total", "Calls to Intuit", ["endpoint", "outcome"])
INTUIT_LATENCY = Histogram(
    "qbo_broker_intuit_call_seconds",
    "Latency of calls to Intuit",
    ["endpoint"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REFRESHES = Counter(
    "qbo_broker_token_refreshes_total",
    "Token refreshes by outcome and trigger",
    ["outcome", "trigger"],
)
REFRESH_TOKENS_LOST = Counter(
    "qbo_broker_refresh_tokens_lost_total",
    "Refreshes whose answer was lost after Intuit may have rotated the refresh token",
)
CONNECTIONS_BY_STATUS = Gauge("qbo_broker_connections", "Connections by status", ["status"])
METRICS_DATABASE_READS = Counter(
    "qbo_broker_metrics_database_reads_total",
    "Reads of the database gauges (qbo_broker_connections, qbo_broker_encrypted_secrets)",
)
SECRETS_BY_KEY = Gauge(
    "qbo_broker_encrypted_secrets", "Stored encrypted secrets by encryption key id", ["key_id"]
)
LINK_RESULTS = Counter("qbo_broker_link_results_total", "Outcomes of the OAuth callback", ["result", "code"])
BACKGROUND_RUNS = Counter("qbo_broker_background_tasks_total", "Background work done", ["task", "outcome"])
BACKGROUND_ROW_ERRORS = Counter(
    "qbo_broker_background_row_errors_total",
    "Rows the background worker left for a later pass (or a replica with the key): "
    "reason unknown_key, undecryptable or error",
    ["task", "reason"],
)
CACHES_ENABLED = Gauge(
    "qbo_broker_caches_enabled",
    "1 while the caches are on (the change feed listens); 0: every read goes to PostgreSQL",
)
QUICKBOOKS_CALLS = Counter(
    "qbo_broker_quickbooks_calls_total",
    "Accounting API requests that reached Intuit (retries included), by Intuit's class "
    "(core, coreplus) and outcome",
    ["class", "outcome"],
)
COREPLUS_BUDGET = Gauge(
    "qbo_broker_coreplus_budget_calls", "The app's monthly CorePlus budget (BROKER_COREPLUS_MONTHLY_BUDGET)"
)
COREPLUS_MONTH_CALLS = Gauge(
    "qbo_broker_coreplus_month_calls",
    "CorePlus calls of the whole app this UTC month, as last read from the database",
)
COREPLUS_BUDGET_THRESHOLD = Gauge(
    "qbo_broker_coreplus_budget_threshold_reached",
    "1 once this UTC month's CorePlus calls reached the threshold (percent of the budget)",
    ["threshold"],
)
COREPLUS_BUDGET_REFUSALS = Counter(
    "qbo_broker_coreplus_budget_refusals_total",
    "CorePlus calls refused because their tenant reached its monthly cap",
)
USAGE_FLUSH_FAILURES = Counter(
    "qbo_broker_usage_flush_failures_total",
    "Writes of the call counts that failed (the counts are kept for the next one)",
)
