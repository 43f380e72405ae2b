"""Public events: the outbox every change writes to, and what carries them out as webhooks (the
sender, signatures, destination checks). Below the features, which all write events."""
