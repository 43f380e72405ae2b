"""Lifecycle of the app's own tasks: background work, and work shared by concurrent callers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

K = TypeVar("K")
T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait until it has finished unwinding (shutdown must not leave it half-run)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def shared(
    running: dict[K, asyncio.Task[T]],
    key: K,
    start: Callable[[], Coroutine[Any, Any, T]],
    *,
    name: str | None = None,
) -> T:
    """The outcome of the work running for `key`, started by `start()` if none is.

    Concurrent callers share one task. It runs to its end even if every caller goes away (a
    caller's cancellation does not reach it), then leaves `running`, unless something else
    took its place there meanwhile. Its exception reaches every caller.
    """
    task = running.get(key)
    if task is None:
        task = asyncio.create_task(start(), name=name)
        running[key] = task

        def done(finished: asyncio.Task[T]) -> None:
            if running.get(key) is finished:
                del running[key]
            if not finished.cancelled():
                finished.exception()  # retrieved: every caller re-raises it itself

        task.add_done_callback(done)
    return await asyncio.shield(task)
