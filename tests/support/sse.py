"""A small server-sent-events reader over an httpx streaming response, for the stream tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def body(self) -> dict[str, Any]:
        assert self.data is not None
        return dict(json.loads(self.data))


class EventReader:
    """The messages of one open stream, as the browser's parser would split them."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while (message := await self.next_message()) is not None:
            yield message

    async def next_message(self) -> Message | None:
        """The next message (events, comments, retry alike); None when the stream ended."""
        message = Message()
        seen = False
        async for line in self._lines:
            if line == "":
                if seen:
                    return message
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                message.comments.append(value)
            elif name == "id":
                message.id = value
            elif name == "event":
                message.event = value
            elif name == "data":
                message.data = value if message.data is None else f"{message.data}\n{value}"
            elif name == "retry":
                message.retry = int(value)
        return message if seen else None

    async def next_event(self, seconds: float = 10.0) -> Message:
        """The next message that is an event (heartbeats and retry hints skipped)."""
        async with asyncio.timeout(seconds):
            while True:
                message = await self.next_message()
                assert message is not None, "the stream ended"
                if message.event is not None:
                    return message

    async def events_until_end(self, seconds: float = 10.0) -> list[Message]:
        async with asyncio.timeout(seconds):
            return [m async for m in self if m.event is not None]
