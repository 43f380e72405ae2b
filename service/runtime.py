"""What the running app holds (settings, database, Intuit client, keys), for endpoints to use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.cache import Caches
from service.config import Settings
from service.intuit.client import IntuitClient
from service.intuit_webhooks.waker import NotificationWaker
from service.tokens.crypto import SecretBox

if TYPE_CHECKING:
    from service.tokens.refresh import TokenRefresher


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    intuit: IntuitClient
    box: SecretBox
    refresher: TokenRefresher
    reads: asyncpg.Pool  # plain asyncpg, for the hot single-statement reads
    caches: Caches = field(default_factory=Caches)
    intuit_notifications: NotificationWaker = field(default_factory=NotificationWaker)


async def get_runtime(request: Request) -> Runtime:
    # async: a plain `def` dependency would be sent to the thread pool on every request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
