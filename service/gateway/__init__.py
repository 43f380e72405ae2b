"""The QuickBooks gateway: services call the Accounting API through the broker, which holds the
tokens, retries safely and keeps every replica within Intuit's per-company limits."""
