"""The channel that wakes every replica's Intuit notification processor after the intake stored
notifications (one NOTIFY for many rows: service.core.db.notify.Waker)."""

CHANNEL = "qbo_broker_intuit_notifications"
