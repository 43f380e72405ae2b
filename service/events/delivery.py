"""Sending webhooks: at least once, retried on a schedule, shared by replicas.

A delivery is leased in one short transaction (service.events.repository.claim: due rows of
enabled endpoints, a bounded number per endpoint in flight anywhere, under an advisory lock so
replicas take turns counting), sent with no transaction open, and its outcome recorded in
another, only if the lease is still ours. A replica killed mid-send leaves its leases to run out
(LEASE, longer than the request timeout); another replica then sends again: at least once.
The sender wakes on the events channel (an event's deliveries are made in its transaction) and
otherwise when the next retry is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from service.core.aio import cancel_and_wait
from service.core.config import Settings
from service.core.crypto import DecryptionError, SecretBox
from service.events import destinations, signing
from service.events import repository as repo
from service.events.outbox import CHANNEL
from service.events.repository import Outcome

log = logging.getLogger(__name__)

# Delays before each attempt: immediately, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and
# 10 h (about 28 hours in all); a delivery whose last attempt fails is marked failed.
RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
LEASE = timedelta(seconds=60)
POLL_SECONDS = 5.0
# How long outcomes wait for others finishing at about the same time, to be recorded together.
RECORD_WINDOW = 0.002
BUSY_RETRY_SECONDS = 0.1
USER_AGENT = "qbo-broker-webhooks/1"
MAX_ANSWER_BYTES = 64 * 1024


def secret_associated_data(endpoint_id: uuid.UUID, which: str) -> str:
    return f"webhook_endpoint:{endpoint_id}:{which}"


def body_of(row: Any) -> bytes:
    """The Standard Webhooks body: type, timestamp and data (tenant, connection, the event's)."""
    data = json.loads(row["data"]) if isinstance(row["data"], str) else dict(row["data"])
    connection_id = row["connection_id"]
    return json.dumps(
        {
            "type": row["type"],
            "timestamp": row["occurred_at"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "data": {
                "tenant_id": row["tenant_id"],
                "connection_id": None if connection_id is None else str(connection_id),
                **data,
            },
        },
        separators=(",", ":"),
    ).encode()


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        box: SecretBox,
        *,
        dsn: str | None = None,
        clock: Callable[[], datetime | None] = lambda: None,
        schedule: Sequence[float] = RETRY_SCHEDULE,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._box = box
        self._dsn = dsn
        self._clock = clock
        self._schedule = tuple(schedule)
        self._transport = transport
        self._clients: dict[tuple[str, int, str | None], httpx.AsyncClient] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None

    # Lifecycle, for the app's lifespan.

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="qbo-broker-webhooks")

    async def stop(self) -> None:
        self._stopping.set()
        await cancel_and_wait(self._task)
        await self.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    def wake(self) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        if self._dsn is None or (self._listener is not None and not self._listener.is_closed()):
            return
        try:
            self._listener = await asyncpg.connect(self._dsn, timeout=5)
            for channel in (CHANNEL, repo.DELIVERIES_CHANNEL):
                await self._listener.add_listener(channel, lambda *_: self._wake.set())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("webhook sender cannot listen for events (%s); polling", type(exc).__name__)
            self._listener = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._listen()
            try:
                attempts = await self.drain()
                wait = POLL_SECONDS
                due = await repo.next_due(self._pool)
                if due is not None:
                    wait = min(wait, max(0.0, (due - datetime.now(UTC)).total_seconds()))
                if not attempts:
                    # Due work this pass could not take (its endpoints' places are all taken by
                    # other replicas): look again shortly, not in a tight loop.
                    wait = max(wait, BUSY_RETRY_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery pass failed")
                wait = POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    # The work.

    async def drain(self) -> int:
        """Send what is due until nothing is due or in flight here; the number of attempts.
        Outcomes that come in together are recorded in one statement, before the next claim
        (their leases count against their endpoints' places until then)."""
        capacity = self._settings.webhook_max_in_flight
        inflight: set[asyncio.Task[Outcome | None]] = set()
        attempts = 0
        try:
            while True:
                self._wake.clear()
                free = capacity - len(inflight)
                claimed = 0
                if free > 0:
                    token, rows = await repo.claim(
                        self._pool,
                        now=self._clock(),
                        lease=LEASE,
                        limit=free,
                        per_endpoint=self._settings.webhook_concurrency_per_endpoint,
                    )
                    claimed = len(rows)
                    attempts += claimed
                    inflight.update(asyncio.create_task(self._send_logged(token, row)) for row in rows)
                if claimed and claimed == free:
                    continue
                if not inflight:
                    return attempts
                woken = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait(
                    {*inflight, woken}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
                finished = {task for task in inflight if task in done}
                if finished and inflight - finished:
                    # Those about to finish too, into the same statement.
                    more, _ = await asyncio.wait(inflight - finished, timeout=RECORD_WINDOW)
                    finished |= more
                inflight.difference_update(finished)
                await self._record([t.result() for t in finished])
        finally:
            for task in inflight:
                task.cancel()

    async def _record(self, outcomes: list[Outcome | None]) -> None:
        recorded = [o for o in outcomes if o is not None]
        if not recorded:
            return
        now = self._clock() or datetime.now(UTC)
        await repo.record_outcomes(self._pool, recorded, now=now)
        for endpoint_id in {o.endpoint_id for o in recorded if o.status_code == 410}:
            await repo.disable_endpoint(
                self._pool, endpoint_id, now=now, reason="the endpoint answered 410 Gone"
            )
            log.warning("webhook endpoint %s answered 410 Gone and was disabled", endpoint_id)

    def _secrets(self, row: Any) -> list[str]:
        endpoint_id = row["endpoint_id"]
        current = [self._box.decrypt(row["secret"], secret_associated_data(endpoint_id, "secret"))]
        expires = row["previous_secret_expires_at"]
        if row["previous_secret"] is not None and expires is not None and expires > datetime.now(UTC):
            current.append(
                self._box.decrypt(
                    row["previous_secret"], secret_associated_data(endpoint_id, "previous_secret")
                )
            )
        return current

    def _client(self, target: destinations.Destination) -> httpx.AsyncClient:
        # One client per host and checked address: a pooled TLS connection made for one host is
        # never reused for another name on the same address.
        key = (target.host, target.port, None if target.address is None else str(target.address))
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = httpx.AsyncClient(
                timeout=self._settings.webhook_timeout_seconds,
                follow_redirects=False,
                transport=self._transport,
                trust_env=False,
                limits=httpx.Limits(max_connections=self._settings.webhook_concurrency_per_endpoint),
            )
        return client

    def _retry_at(self, attempts: int) -> datetime | None:
        if attempts >= len(self._schedule):
            return None
        return (self._clock() or datetime.now(UTC)) + timedelta(seconds=self._schedule[attempts])

    async def _send_logged(self, token: uuid.UUID, row: Any) -> Outcome | None:
        try:
            return await self._send(token, row)
        except asyncio.CancelledError:
            raise
        except Exception:  # this delivery's; its lease runs out and it is sent again
            log.exception("webhook delivery %s failed unexpectedly", row["id"])
            return None

    async def _send(self, token: uuid.UUID, row: Any) -> Outcome:
        """One attempt, with no transaction open; its outcome, to record."""
        started = time.monotonic()
        status: int | None = None
        error: str
        try:
            body = body_of(row)
            headers = signing.headers(
                self._secrets(row), msg_id=str(row["event_id"]), timestamp=int(time.time()), body=body
            )
            headers["user-agent"] = USER_AGENT
            target = await destinations.resolve(
                row["url"], allow_private=self._settings.webhook_allow_private
            )
            url, extensions = httpx.URL(target.url), {}
            if target.address is not None:  # send to the address that was checked
                headers["host"] = url.netloc.decode("ascii")
                extensions["sni_hostname"] = target.host
                url = url.copy_with(host=str(target.address))
            async with self._client(target).stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                status = response.status_code
                # Read a short answer to its end, so the connection is kept for the next
                # delivery; a longer one is not read on (the connection is closed instead).
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > MAX_ANSWER_BYTES:
                        break
            if 200 <= status < 300:
                return Outcome(
                    row["id"],
                    token,
                    row["endpoint_id"],
                    succeeded=True,
                    status_code=status,
                    duration_ms=_ms_since(started),
                )
            error = f"the endpoint answered {status}"
        except destinations.DestinationRefused as exc:
            error = f"destination refused: {exc}"
        except DecryptionError:
            error = "the endpoint's secret does not open under the configured keys"
        except httpx.TimeoutException:
            error = "timed out"
        except httpx.HTTPError as exc:
            error = f"request failed ({type(exc).__name__})"
        return Outcome(
            row["id"],
            token,
            row["endpoint_id"],
            succeeded=False,
            status_code=status,
            duration_ms=_ms_since(started),
            error=error,
            retry_at=None if status == 410 else self._retry_at(row["attempts"]),
        )


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
