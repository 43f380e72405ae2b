"""Intuit's webhooks, as the emulator sends them: data changes, POSTed to the app's endpoint.

As Intuit does it: one endpoint per app for every company; the changes of a short window sent
together, in the legacy `eventNotifications` format, as a CloudEvents array, or (during the
migration) both; signed `intuit-signature: base64(HMAC-SHA256(verifier token, body))`; retried
when the endpoint fails, and now and then delivered twice. Changes are collected while the
store's lock is held and sent later from the event loop, so no API answer waits for a delivery
and nothing is sent for a change before it is made.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from .books import Change

log = logging.getLogger(__name__)

Format = Literal["legacy", "cloudevents", "both"]
_VERBS = {
    "Create": "created",
    "Update": "updated",
    "Delete": "deleted",
    "Merge": "merged",
    "Void": "voided",
    "Emailed": "emailed",
}
_DELIVERIES_KEPT = 1000


@dataclass
class WebhookConfig:
    url: str | None = None
    verifier_token: str | None = None
    format: Format = "cloudevents"
    batch_window_s: float = 0.2
    # Chance that a delivered notification is sent a second time, as Intuit's retries do.
    duplicate_probability: float = 0.0
    max_attempts: int = 3
    retry_delay_s: float = 1.0
    timeout_s: float = 5.0


def sign(token: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(token.encode(), body, hashlib.sha256).digest()).decode()


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def legacy_body(changes: list[Change]) -> bytes:
    """`{"eventNotifications": [...]}`, one entry per company, its changes in order."""
    by_realm: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        stamp = _utc(change.time)
        by_realm.setdefault(change.realm_id, []).append(
            {
                "name": change.entity,
                "id": change.entity_id,
                "operation": change.operation,
                "lastUpdated": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            }
        )
    return json.dumps(
        {
            "eventNotifications": [
                {"realmId": realm, "dataChangeEvent": {"entities": entities}}
                for realm, entities in by_realm.items()
            ]
        }
    ).encode()


def cloudevents_body(changes: list[Change], source: str) -> bytes:
    """A JSON array of CloudEvents 1.0, one per change (Intuit stamps nanoseconds)."""
    events = []
    for change in changes:
        stamp = _utc(change.time)
        verb = _VERBS.get(change.operation, change.operation.lower())
        events.append(
            {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": source,
                "type": f"qbo.{change.entity.lower()}.{verb}.v1",
                "datacontenttype": "application/json",
                "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}000Z",
                "intuitentityid": change.entity_id,
                "intuitaccountid": change.realm_id,
                "data": {},
            }
        )
    return json.dumps(events).encode()


class WebhookSender:
    """Collects changes (from any thread) and delivers them from the app's event loop."""

    def __init__(self, initial: WebhookConfig, client_id: str) -> None:
        self._initial = initial
        self.config = replace(initial)
        self._source = "intuit." + base64.b64encode(hashlib.sha256(client_id.encode()).digest()).decode()
        self._lock = threading.Lock()
        self._pending: list[Change] = []
        self._flush_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=_DELIVERIES_KEPT)

    # -- lifecycle (the app's lifespan) -------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._http = httpx.AsyncClient()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        self._loop = None

    def reset(self) -> None:
        with self._lock:
            self.config = replace(self._initial)
            self._pending.clear()
            self.deliveries.clear()

    def configure(self, **changes: Any) -> None:
        with self._lock:
            self.config = replace(self.config, **changes)

    # -- collecting ---------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        """A Books listener: called with the store's lock held; only queues."""
        loop = self._loop
        with self._lock:
            if loop is None or not self.config.url or not self.config.verifier_token:
                return
            self._pending.append(change)
            if self._flush_due:
                return
            self._flush_due = True
            window = self.config.batch_window_s
        loop.call_soon_threadsafe(self._spawn, self._flush_after(window))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_after(self, window: float) -> None:
        await asyncio.sleep(window)
        with self._lock:
            changes, self._pending = self._pending, []
            self._flush_due = False
            config = replace(self.config)
        if not changes or not config.url or not config.verifier_token:
            return
        bodies: list[tuple[str, bytes]] = []
        if config.format in ("legacy", "both"):
            bodies.append(("legacy", legacy_body(changes)))
        if config.format in ("cloudevents", "both"):
            bodies.append(("cloudevents", cloudevents_body(changes, self._source)))
        for kind, body in bodies:
            await self._deliver(config, kind, body, len(changes), repeat=False)
            if random.random() < config.duplicate_probability:  # noqa: S311 - a test knob
                await self._deliver(config, kind, body, len(changes), repeat=True)

    # -- delivering ---------------------------------------------------------------------------

    async def _deliver(
        self, config: WebhookConfig, kind: str, body: bytes, changes: int, *, repeat: bool
    ) -> None:
        assert self._http is not None and config.url and config.verifier_token
        headers = {"content-type": "application/json", "intuit-signature": sign(config.verifier_token, body)}
        for attempt in range(1, config.max_attempts + 1):
            started = time.monotonic()
            record: dict[str, Any] = {
                "at": _utc(time.time()).isoformat(),
                "url": config.url,
                "format": kind,
                "changes": changes,
                "attempt": attempt,
                "repeat": repeat,
                "bytes": len(body),
            }
            try:
                response = await self._http.post(
                    config.url, content=body, headers=headers, timeout=config.timeout_s
                )
                record["status"] = response.status_code
            except httpx.HTTPError as exc:
                record["error"] = type(exc).__name__
            record["duration_ms"] = round((time.monotonic() - started) * 1000, 2)
            self.deliveries.append(record)
            if 200 <= record.get("status", 0) < 300:
                return
            if attempt < config.max_attempts:
                await asyncio.sleep(config.retry_delay_s * 2 ** (attempt - 1))
        log.warning("webhook to %s given up after %d attempts", config.url, config.max_attempts)

    def view(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["verifier_token_set"] = bool(config.pop("verifier_token"))
        with self._lock:
            config["pending_changes"] = len(self._pending)
        return config
