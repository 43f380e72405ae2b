"""Processing survives crashes and is shared by replicas: notifications stored by a broker that
does not process them, and rows a killed replica had claimed and half worked on, are processed
by the replicas that come up later, each entity change into exactly one event."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import httpx

from service.core.db.engine import asyncpg_dsn
from service.main import create_app
from tests.conftest import COMPANY_1, Stack, broker_settings
from tests.intuit_webhooks.test_intake import (
    NEW_TOKEN,
    entity_events,
    legacy,
    post,
    recently,
    stored,
    unprocessed,
)
from tests.support.db_helpers import execute, fetchrow
from tests.support.servers import ThreadedServer, free_port
from tests.support.waiting import until


@contextmanager
def broker(stack: Stack, *, processing: bool) -> Iterator[str]:
    port = free_port()
    settings = broker_settings(
        stack.database_url,
        port,
        stack.emulator_url,
        INTUIT_WEBHOOK_VERIFIER_TOKENS=NEW_TOKEN,
        BROKER_BACKGROUND_ENABLED=processing,
        BROKER_BACKGROUND_INTERVAL=3600,
    )
    server = ThreadedServer(create_app(settings), port).start()
    try:
        yield server.url
    finally:
        server.stop()


async def store_notifications(url: str, count: int, when: str | None = None) -> None:
    when = when or recently()[0]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for index in range(count):
            body = legacy(COMPANY_1, ("Invoice", str(index), "Create", when))
            assert (await post(http, body)).status_code == 200


async def test_a_killed_replicas_claim_is_processed_by_the_next(
    stack: Stack, linked: Callable[..., Awaitable[str]]
) -> None:
    await linked()
    with broker(stack, processing=False) as intake:
        await store_notifications(intake, 3)
    assert await unprocessed(stack.database_url) == 3
    # A replica claims them and gets halfway (a change key written) when it is killed.
    dying = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    await dying.execute("BEGIN")
    ids = await dying.fetch(
        "SELECT id FROM intuit_notifications WHERE processed_at IS NULL ORDER BY id FOR UPDATE SKIP LOCKED"
    )
    assert len(ids) == 3
    await dying.execute(
        "INSERT INTO intuit_entity_changes (realm_id, entity, entity_id, operation, "
        "occurred_second, notification_id, outcome) VALUES ($1, 'Invoice', '0', 'Create', "
        "now(), $2, 'emitted')",
        COMPANY_1,
        ids[0]["id"],
    )
    pid = dying.get_server_pid()
    dying.terminate()  # no commit, no rollback: the connection is gone

    async def gone() -> bool:
        row = await fetchrow(
            stack.database_url, "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid
        )
        return row is not None and row["n"] == 0

    await until(gone, "the server to end the killed replica's session")
    with broker(stack, processing=True):

        async def done() -> bool:
            return await unprocessed(stack.database_url) == 0

        await until(done, "the next replica to process what the killed one held")
    events = await entity_events(stack.database_url)
    assert sorted(e["data"]["entity_id"] for e in events) == ["0", "1", "2"]


async def test_two_replicas_processing_at_once_emit_each_change_once(
    stack: Stack, linked: Callable[..., Awaitable[str]]
) -> None:
    await linked()
    with broker(stack, processing=False) as intake:
        when, _ = recently()
        await store_notifications(intake, 150, when)
        # The same changes again, as Intuit's retries: every one a duplicate.
        await store_notifications(intake, 150, when)
    assert await stored(stack.database_url) == 300
    with broker(stack, processing=True), broker(stack, processing=True):

        async def done() -> bool:
            return await unprocessed(stack.database_url) == 0

        await until(done, "two replicas to process 300 notifications", within=60)
    events = await entity_events(stack.database_url)
    assert sorted(int(e["data"]["entity_id"]) for e in events) == list(range(150))
    outcomes = await _outcomes(stack.database_url)
    assert outcomes == {"emitted": 150, "duplicate": 150}


async def _outcomes(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "SELECT key, sum(value::int) AS n FROM intuit_notifications, "
            "jsonb_each_text(outcomes) GROUP BY key"
        )
    finally:
        await conn.close()
    return {row["key"]: row["n"] for row in rows}


async def test_a_notification_that_keeps_failing_is_set_aside(
    stack: Stack, linked: Callable[..., Awaitable[str]]
) -> None:
    await linked()
    when, _ = recently()
    with broker(stack, processing=False) as intake:
        async with httpx.AsyncClient(base_url=intake, timeout=30) as http:
            for entity_id in ("1", "poison", "2"):
                body = legacy(COMPANY_1, ("Invoice", entity_id, "Create", when))
                assert (await post(http, body)).status_code == 200
    # A fault the processor cannot get past for one notification: its change cannot be recorded.
    await execute(
        stack.database_url,
        """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.entity_id = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON intuit_entity_changes
        FOR EACH ROW EXECUTE FUNCTION refuse_poison();""",
    )
    try:
        with broker(stack, processing=True):

            async def done() -> bool:
                return await unprocessed(stack.database_url) == 0

            await until(done, "every notification processed or set aside")
    finally:
        await execute(
            stack.database_url,
            "DROP TRIGGER refuse_poison ON intuit_entity_changes; DROP FUNCTION refuse_poison()",
        )
    events = await entity_events(stack.database_url)
    assert sorted(e["data"]["entity_id"] for e in events) == ["1", "2"]
    poisoned = await fetchrow(
        stack.database_url,
        "SELECT attempts, last_error, outcomes FROM intuit_notifications WHERE attempts > 0",
    )
    assert poisoned is not None
    assert (poisoned["attempts"], poisoned["outcomes"]) == (5, None)
    assert poisoned["last_error"] == "DBAPIError"  # the class only: no message, no data
