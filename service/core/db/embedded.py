"""An embedded PostgreSQL (the pgserver wheel) for when DATABASE_URL is unset."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path, database: str = "qbo_broker") -> str:
    """Start (or reuse) a PostgreSQL server under data_dir/postgres and return its URL.

    pgserver keeps the server running while any process uses it, so replicas started from one
    data directory share one server.
    """
    import pgserver

    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    # `database` is ours, never a caller's input.
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608
    if "1 row" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    log.info("embedded PostgreSQL running in %s", pgdata)
    # pgserver listens on a Unix socket inside its data directory.
    return f"postgresql://postgres:@/{database}?host={pgdata}"
