"""How a refresh waits for another replica's: woken by the holder's commit (a change
notification), not by a poll, even when the commit lands before the wait begins; holding neither
a refresh slot nor a pooled connection while it waits; and how the lock rounds batch requests.

Each "replica" here is the broker's own objects (refresher, change feed, lock session, pool),
built in the test process against the test database, as service.main builds them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from service.core.cache import Caches, ChangeFeed, Watch
from service.core.db.engine import asyncpg_dsn
from service.runtime import Runtime, build_runtime
from service.tokens import refresh
from service.tokens.locks import RefreshLocks
from tests.conftest import COMPANY_1, Stack
from tests.support.db_helpers import expire_access_token, fetchrow
from tests.support.waiting import until

# Far longer than any test here may take: a wait that ends is a wait that was woken.
NO_POLL = 120.0


@pytest.fixture
async def replicas(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[Runtime]]]:
    """Broker runtimes on the test database, each as a replica's process holds it."""
    async with AsyncExitStack() as stack_of:

        async def make(*, pool_size: int = 4, **settings: Any) -> Runtime:
            # Settings by field name (model_copy would take any other name, and change nothing).
            unknown = set(settings) - set(type(stack.settings).model_fields)
            assert not unknown, f"not a setting: {unknown}"
            config = stack.settings.model_copy(update={"db_pool_size": pool_size, **settings})
            return await stack_of.enter_async_context(build_runtime(config, database_url=stack.database_url))

        yield make


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refresh, "SAFETY_POLL_SECONDS", NO_POLL)
    monkeypatch.setattr(refresh, "WAIT_POLL_SECONDS", NO_POLL)


async def _at_intuit(emulator: Any, realm: str = COMPANY_1) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stats = (await emulator.get("/stats")).json()
        return bool(stats["in_flight_refresh"].get(realm) == 1)

    return check


async def _refreshes(emulator: Any) -> dict[str, int]:
    return dict((await emulator.get("/stats")).json()["token"].get("refresh_token", {}))


async def test_a_waiting_replica_is_woken_by_the_holders_commit(
    replicas, linked, emulator, stack, no_poll
) -> None:
    cid = uuid.UUID(await linked())
    one, other = await replicas(), await replicas()
    await emulator.post("/config", json={"latency_ms": 600})
    await expire_access_token(stack.database_url, str(cid))
    holding = asyncio.create_task(one.refresher.access_token(await one.refresher.view(cid)))
    await until(await _at_intuit(emulator), "the first replica's refresh to reach Intuit")
    waiting = asyncio.create_task(other.refresher.access_token(await other.refresher.view(cid)))
    token = await holding
    # Polls are off: only the notification of the commit can end the other replica's wait.
    waited = await asyncio.wait_for(waiting, timeout=10)
    assert waited.access_token == token.access_token
    assert await _refreshes(emulator) == {"ok": 1}


async def test_a_commit_between_the_refused_lock_and_the_wait_is_not_missed(
    replicas, linked, emulator, stack, no_poll, monkeypatch
) -> None:
    cid = uuid.UUID(await linked())
    one, other = await replicas(), await replicas()
    await emulator.post("/config", json={"latency_ms": 300})
    await expire_access_token(stack.database_url, str(cid))
    holding = asyncio.create_task(one.refresher.access_token(await one.refresher.view(cid)))
    await until(await _at_intuit(emulator), "the first replica's refresh to reach Intuit")
    refused_lock = other.locks.acquire
    delivered = asyncio.Event()

    async def acquire_then_let_the_holder_finish(connection_id: uuid.UUID, **kwargs: Any) -> Any:
        hold = await refused_lock(connection_id, **kwargs)
        assert hold is None  # the first replica holds it
        # The holder commits, and its notification reaches this replica, after the lock was
        # refused and before the wait for the commit starts: the worst moment.
        async with other.feed.watching(str(connection_id)) as watch:
            await holding
            await asyncio.wait_for(watch.changed.wait(), timeout=10)
        delivered.set()
        return hold

    monkeypatch.setattr(other.locks, "acquire", acquire_then_let_the_holder_finish)
    waited = await asyncio.wait_for(other.refresher.access_token(await other.refresher.view(cid)), timeout=10)
    assert delivered.is_set()
    assert waited.access_token == (await holding).access_token
    assert await _refreshes(emulator) == {"ok": 1}


async def test_a_commit_before_the_wait_began_is_seen_by_looking_at_the_row(
    replicas, linked, emulator, stack, no_poll
) -> None:
    cid = uuid.UUID(await linked())
    one, other = await replicas(), await replicas()
    await expire_access_token(stack.database_url, str(cid))
    # The other replica read the connection (expired) before the first one's refresh committed,
    # and its own refresh starts only after: no notification is left for it to hear.
    stale = await other.refresher.view(cid)
    assert stale is not None and other.refresher.fresh_token(stale) is None
    token = await one.refresher.access_token(await one.refresher.view(cid))
    # And the lock is still taken when it asks (a holder whose unlock has not gone out yet).
    holder = RefreshLocks(asyncpg_dsn(stack.database_url))
    try:
        assert await holder.acquire(cid) is not None
        waited = await asyncio.wait_for(other.refresher.access_token(stale), timeout=10)
    finally:
        await holder.close()
    assert waited.access_token == token.access_token
    assert await _refreshes(emulator) == {"ok": 1}


async def test_a_waiter_needs_no_refresh_slot(replicas, linked, emulator, stack, no_poll) -> None:
    cid = uuid.UUID(await linked())
    one, other = await replicas(), await replicas(refresh_concurrency=1)
    await emulator.post("/config", json={"latency_ms": 300})
    await expire_access_token(stack.database_url, str(cid))
    # Every refresh slot of the other replica is busy (with refreshes of other connections).
    await other.refresher._slots.acquire()
    try:
        holding = asyncio.create_task(one.refresher.access_token(await one.refresher.view(cid)))
        await until(await _at_intuit(emulator), "the first replica's refresh to reach Intuit")
        waited = await asyncio.wait_for(
            other.refresher.access_token(await other.refresher.view(cid)), timeout=10
        )
        assert waited.access_token == (await holding).access_token
    finally:
        other.refresher._slots.release()


async def test_a_request_queued_for_a_slot_is_woken_by_another_replicas_commit(
    replicas, linked, emulator, stack, no_poll
) -> None:
    cid = uuid.UUID(await linked())
    one, other = await replicas(), await replicas(refresh_concurrency=1)
    await expire_access_token(stack.database_url, str(cid))
    # Every refresh slot of the other replica is busy, and no one holds the connection's lock
    # yet: its request queues for a slot.
    await other.refresher._slots.acquire()
    try:
        waiting = asyncio.create_task(other.refresher.access_token(await other.refresher.view(cid)))

        async def queued() -> bool:
            return len(other.refresher._slots._waiters or ()) == 1

        await until(queued, "the other replica's request to queue for a slot")
        token = await one.refresher.access_token(await one.refresher.view(cid))
        # The slot is still taken: only the notification of the first replica's commit can
        # end the queued request's wait.
        waited = await asyncio.wait_for(waiting, timeout=10)
        assert waited.access_token == token.access_token
        assert not other.refresher._slots._waiters  # it left the queue
    finally:
        other.refresher._slots.release()
    assert await _refreshes(emulator) == {"ok": 1}
    # The slot it queued for was not taken and kept: the replica can refresh again.
    assert not other.refresher._slots.locked()


async def test_no_refresh_waits_for_a_pooled_connection_while_intuit_answers_another(
    replicas, linked_company, emulator, stack
) -> None:
    (first, first_realm), (second, second_realm) = [await linked_company(i) for i in (1, 2)]
    replica = await replicas(pool_size=1)
    await emulator.post("/config", json={"latency_ms": 1500})
    for cid in (first, second):
        await expire_access_token(stack.database_url, cid)
    views = [await replica.refresher.view(uuid.UUID(cid)) for cid in (first, second)]
    asked = [asyncio.create_task(replica.refresher.access_token(v)) for v in views]

    async def both_at_intuit() -> bool:
        stats = (await emulator.get("/stats")).json()["in_flight_refresh"]
        return bool(stats.get(first_realm) == 1 and stats.get(second_realm) == 1)

    # One pooled connection, and both refreshes are at Intuit at once.
    await until(both_at_intuit, "both refreshes to be at Intuit together", within=10.0)
    await asyncio.gather(*asked)


async def test_a_lock_freed_and_asked_for_again_in_one_round_is_held_once(stack) -> None:
    dsn = asyncpg_dsn(stack.database_url)
    one, other = RefreshLocks(dsn), RefreshLocks(dsn)
    cid = uuid.uuid4()
    try:
        hold = await one.acquire(cid)
        assert hold is not None
        # Released and asked for again before the next round goes out: one round carries both.
        one.release(hold)
        again = await one.acquire(cid)
        assert again is not None and again.valid and not hold.valid
        assert await other.acquire(cid) is None
        one.release(again)

        async def free() -> bool:
            grant = await other.acquire(cid)
            if grant is not None:
                other.release(grant)
            return grant is not None

        # Not left nested at the server: one release frees it.
        await until(free, "the lock to be free after one release", within=10.0)
    finally:
        await one.close()
        await other.close()


async def test_the_feed_wakes_waiters_when_it_goes_down_and_comes_back(stack) -> None:
    dsn = asyncpg_dsn(stack.database_url)
    listening = (
        "SELECT array_agg(pid) AS pids FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
        "AND datname = current_database()"
    )
    before = set((await fetchrow(stack.database_url, listening))["pids"] or [])  # type: ignore[index]
    feed = ChangeFeed(dsn, Caches(), retry_seconds=0.1)
    await feed.start()
    try:
        async with feed.watching(str(uuid.uuid4())) as watch:
            assert watch.notified and not watch.changed.is_set()
            mine = set((await fetchrow(stack.database_url, listening))["pids"]) - before  # type: ignore[index]
            assert len(mine) == 1
            await fetchrow(stack.database_url, "SELECT pg_terminate_backend($1)", mine.pop())
            # Lost: a change may go unheard, so whoever waits looks again, and polls from then.
            await asyncio.wait_for(watch.changed.wait(), timeout=10)
            watch.changed.clear()

            async def back() -> bool:
                return watch.notified

            await until(back, "the feed to listen again", within=10.0)
            # Back: changes made meanwhile were not heard, so whoever waits looks again.
            await asyncio.wait_for(watch.changed.wait(), timeout=10)
    finally:
        await feed.stop()


async def test_a_probe_tells_whether_another_process_holds_a_lock_and_takes_nothing(stack) -> None:
    dsn = asyncpg_dsn(stack.database_url)
    one, other = RefreshLocks(dsn), RefreshLocks(dsn)
    held, free = uuid.uuid4(), uuid.uuid4()
    try:
        hold = await one.acquire(held)
        assert hold is not None
        # Probed together, in one round: one answer each, and probes of one key share it.
        answers = await asyncio.gather(other.is_free(held), other.is_free(free), other.is_free(free))
        assert answers == [False, True, True]
        assert not await one.is_free(held)  # its own: not free either
        # The probe left nothing held: both processes can still take the free one.
        taken = await other.acquire(free)
        assert taken is not None
        other.release(taken)

        async def free_for_one() -> bool:
            grant = await one.acquire(free)
            if grant is not None:
                one.release(grant)
            return grant is not None

        await until(free_for_one, "the probed lock to be free", within=10.0)
        one.release(hold)

        async def released() -> bool:
            return await other.is_free(held)

        await until(released, "the released lock to be free", within=10.0)
    finally:
        await one.close()
        await other.close()


async def test_reads_gathered_in_one_statement_answer_each_caller(replicas, linked_company, stack) -> None:
    first, second = [uuid.UUID((await linked_company(i))[0]) for i in (1, 2)]
    replica = await replicas(pool_size=1)
    missing = uuid.uuid4()
    # Cache misses of two connections and of one that does not exist, all at once and twice
    # over, on a pool of one connection: each caller gets its own row (or None).
    views = await asyncio.gather(*(replica.refresher.view(cid) for cid in (first, second, missing) * 2))
    assert [v.id if v else None for v in views] == [first, second, None] * 2
    # A read asked for after a change sees it, whatever was read before.
    await expire_access_token(stack.database_url, str(first), seconds_left=30)
    replica.refresher._caches.connections.invalidate(str(first))
    again = await replica.refresher.view(first)
    before = next(v for v in views if v and v.id == first)
    assert again is not None and before.access_token_expires_at is not None
    assert again.access_token_expires_at is not None
    assert again.access_token_expires_at < before.access_token_expires_at


async def _not_asked() -> tuple[bool, Any]:
    raise AssertionError("the row was looked at without a change")


@pytest.mark.parametrize("granted_as_cancelled", [False, True])
async def test_a_slot_wait_cut_short_keeps_no_slot(replicas, granted_as_cancelled: bool) -> None:
    refresher = (await replicas(refresh_concurrency=1)).refresher
    await refresher._slots.acquire()
    queued = asyncio.create_task(refresher._slot_or_token(Watch(None), _not_asked, refresh._OFF))
    await until(lambda: asyncio.sleep(0, bool(refresher._slots._waiters)), "the wait to queue for the slot")
    if granted_as_cancelled:
        refresher._slots.release()  # the slot goes to the queued wait, which is cancelled at once
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await asyncio.sleep(0)  # the give-back, if any, runs as a callback
    if not granted_as_cancelled:
        refresher._slots.release()
    assert refresher._slots._value == 1 and not refresher._slots._waiters


async def test_a_change_after_which_a_refresh_is_still_due_keeps_the_place_in_the_queue(replicas) -> None:
    refresher = (await replicas(refresh_concurrency=1)).refresher
    await refresher._slots.acquire()
    # Two requests queued for the one slot; the first hears of a change to its row, which is
    # still due when it looks.
    first_watch, looks = Watch(None), 0

    async def still_due() -> tuple[bool, Any]:
        nonlocal looks
        looks += 1
        return True, None

    first = asyncio.create_task(refresher._slot_or_token(first_watch, still_due, refresh._OFF))
    await until(lambda: asyncio.sleep(0, len(refresher._slots._waiters or ()) == 1), "the first to queue")
    second = asyncio.create_task(refresher._slot_or_token(Watch(None), _not_asked, refresh._OFF))
    await until(lambda: asyncio.sleep(0, len(refresher._slots._waiters or ()) == 2), "the second to queue")
    first_watch.changed.set()
    await until(lambda: asyncio.sleep(0, looks == 1), "the first to look at its row")
    refresher._slots.release()
    # The slot goes to the first, which never left its place ahead of the second.
    assert await asyncio.wait_for(first, timeout=5) is None
    assert not second.done()
    refresher._slots.release()
    assert await asyncio.wait_for(second, timeout=5) is None
    refresher._slots.release()
    assert refresher._slots._value == 1
