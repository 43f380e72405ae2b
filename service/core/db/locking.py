"""PostgreSQL advisory locks: the primitive for "only one of these, anywhere"."""

# A fixed 64-bit key ("QBOBMIGR"): replicas migrating at once take turns on it.
MIGRATION_LOCK_KEY = 0x5142_4F42_4D49_4752

# The first key of a tenant's transaction-level advisory lock (the second: hashtext(tenant_id)).
# Two-key locks never collide with the one-key locks above and in service/tokens/locks.py.
TENANT_LOCK_NAMESPACE = 0x5142_4F54  # "QBOT"
