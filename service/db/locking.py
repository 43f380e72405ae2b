"""PostgreSQL advisory locks: the primitive for "only one of these, anywhere"."""

# A fixed 64-bit key ("QBOBMIGR"): replicas migrating at once take turns on it.
MIGRATION_LOCK_KEY = 0x5142_4F42_4D49_4752
