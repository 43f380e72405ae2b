"""Calls of one statement for many connections, gathered into one round trip while another is
out (the refresher's reads and decisions in a storm)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar


class _Row(Protocol):
    @property
    def id(self) -> uuid.UUID: ...


R = TypeVar("R", bound=_Row)

# The args of one call of a gathered statement, and a batch of calls.
Batch = list[tuple[uuid.UUID, tuple[Any, ...]]]


class Gathered(Generic[R]):
    """Calls of one statement for many connections, gathered: a call made while none is out goes
    at once; those made while one is out go together in the next statement, which starts after
    every one of them was made. A storm's hundreds of calls (reads on cache misses and by waiters
    woken by the same commit, decisions of the refreshes that just took their locks) take a
    pooled connection for a few round trips, instead of queueing for the pool one by one. Calls
    with the same connection and arguments share one answer; `run` returns one row per
    connection (by `id`), or none for a connection it did not find (the call's answer: None).
    """

    def __init__(self, run: Callable[[Batch], Awaitable[list[R]]], name: str) -> None:
        self._run = run
        self._name = name
        self._asked: dict[tuple[uuid.UUID, tuple[Any, ...]], asyncio.Future[R | None]] = {}
        self._running: asyncio.Task[None] | None = None

    async def __call__(self, connection_id: uuid.UUID, *args: Any) -> R | None:
        key = (connection_id, args)
        future = self._asked.get(key)
        if future is None:
            future = self._asked[key] = asyncio.get_running_loop().create_future()
            if self._running is None or self._running.done():
                self._running = asyncio.create_task(self._run_all(), name=self._name)
        return await asyncio.shield(future)

    async def _run_all(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                rows = {row.id: row for row in await self._run(list(asked))}
            except BaseException as exc:
                for future in asked.values():
                    if not future.done():
                        future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError(f"{self._name} stopped")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for (connection_id, _), future in asked.items():
                if not future.done():
                    future.set_result(rows.get(connection_id))


def columns(batch: Batch) -> list[list[Any]]:
    """A batch of calls as arrays: the ids, then each argument's column."""
    return [[cid for cid, _ in batch], *(list(column) for column in zip(*(a for _, a in batch), strict=True))]
