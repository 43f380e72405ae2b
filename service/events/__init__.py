"""Public events: the outbox every change writes to, and the webhooks that carry them out."""
