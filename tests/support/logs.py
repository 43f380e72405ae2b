"""The broker's JSON log lines, captured in memory for a test."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from service.core.observability import JSONFormatter


@contextmanager
def captured_json_logs(level: int) -> Iterator[io.StringIO]:
    """Every record at `level` or above, formatted as the broker logs it; levels restored after."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    root, service = logging.getLogger(), logging.getLogger("service")
    old_levels = root.level, service.level
    root.addHandler(handler)
    root.setLevel(level)
    service.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_levels[0])
        service.setLevel(old_levels[1])
