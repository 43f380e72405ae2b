"""Database plumbing: engine and sessions, the embedded server, advisory locks."""
