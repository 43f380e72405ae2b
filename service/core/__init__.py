"""Shared foundations: configuration, errors, database, caches and change feed, keys, logging,
metrics, asyncio helpers and the HTTP server options. Imports nothing from the features."""
