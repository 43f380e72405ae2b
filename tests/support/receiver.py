"""A webhook receiver for tests: a real HTTP server that records what it is sent and answers
with the statuses it is told to."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.support.servers import ThreadedServer, free_port


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str


@dataclass
class Receiver:
    """Answers `statuses` in turn, then `status`; `delay` seconds per request."""

    status: int = 200
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    active_ids: Counter[str] = field(default_factory=Counter)
    overlaps: int = 0  # requests that arrived while one with the same webhook-id was in flight
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        msg_id = headers.get("webhook-id", "")
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else self.status
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.active_ids[msg_id]:
                self.overlaps += 1
            self.active_ids[msg_id] += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            with self._lock:
                self.active -= 1
                self.active_ids[msg_id] -= 1
                self.received.append(Received(headers, body, scope["path"]))
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    def ids(self) -> list[str]:
        with self._lock:
            return [r.headers["webhook-id"] for r in self.received]


def start_receiver(receiver: Receiver) -> ThreadedServer:
    return ThreadedServer(receiver, free_port()).start()
