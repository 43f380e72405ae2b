"""What the running app holds (settings, database, Intuit client, keys), for endpoints to use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.intuit.client import IntuitClient
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


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
