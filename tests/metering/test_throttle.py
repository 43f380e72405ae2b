"""The realm throttle's slots against a real PostgreSQL: a finished call's slot goes back with the
realm's next admission, or on its own a moment later, and never frees a slot that lapsed and was
taken by another call meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from service.core.config import Settings
from service.core.db.engine import asyncpg_dsn, create_asyncpg_pool
from service.metering import throttle as throttle_module
from service.metering.throttle import RETURN_SECONDS, QuickBooksThrottled, RealmThrottle

REALM = "9341450000000001"
ONE_SLOT = {
    "BROKER_QUICKBOOKS_MAX_IN_FLIGHT": 1,
    "BROKER_QUICKBOOKS_PER_SECOND": 0,
    "BROKER_QUICKBOOKS_PER_MINUTE": 0,
    "BROKER_QUICKBOOKS_BATCH_PER_MINUTE": 0,
}


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    await conn.execute("DELETE FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM)
    yield conn
    await conn.close()


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Throttles as replicas have them: each on a pool of its own; closed at the end."""
    made: list[tuple[RealmThrottle, asyncpg.Pool]] = []

    async def make() -> RealmThrottle:
        pool = await create_asyncpg_pool(database_url, max_size=2)
        throttle = RealmThrottle(Settings(**ONE_SLOT), pool)
        made.append((throttle, pool))
        return throttle

    yield make
    for throttle, pool in made:
        await throttle.aclose()
        await pool.close()


async def held(db: asyncpg.Connection) -> int:
    leases = await db.fetchval("SELECT leases FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM)
    return sum(1 for lease in leases or [] if lease is not None)


async def test_the_next_admission_takes_the_finished_calls_slot_back(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)  # only an admission gives it back
    throttle = await replicas()
    first = await throttle.admit(REALM, batch=False, wait_seconds=0)
    throttle.release_soon(first)
    assert await held(db) == 1  # not given back by a statement of its own
    # The only slot is free again for the admission that carries it back: no wait allowed.
    second = await throttle.admit(REALM, batch=False, wait_seconds=0)
    assert second.slot == first.slot and second.expires_at != first.expires_at
    assert await held(db) == 1
    throttle.release_soon(second)


async def test_a_slot_no_admission_takes_goes_back_on_its_own(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    one, other = await replicas(), await replicas()
    lease = await one.admit(REALM, batch=False, wait_seconds=0)
    with pytest.raises(QuickBooksThrottled):
        await other.admit(REALM, batch=False, wait_seconds=0)
    one.release_soon(lease)
    # No admission follows: the slot goes back within RETURN_SECONDS (plus a statement).
    await asyncio.sleep(RETURN_SECONDS * 5)
    assert await held(db) == 0
    assert (await other.admit(REALM, batch=False, wait_seconds=0)).slot == lease.slot


async def test_a_late_give_back_leaves_a_slot_taken_since_alone(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    throttle = await replicas()

    async def taken_by_another_call(slot: int | None) -> Any:
        # The lease lapsed (a stalled replica) and another replica's call took the slot.
        return await db.fetchval(
            "UPDATE quickbooks_realm_throttles SET leases[$2] = clock_timestamp() + interval '1 minute' "
            "WHERE realm_id = $1 RETURNING leases[$2]",
            REALM,
            slot,
        )

    async def slot_lease(slot: int | None) -> Any:
        return await db.fetchval(
            "SELECT leases[$2] FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM, slot
        )

    # Carried by the next admission: the slot stays the other call's, so there is no room.
    lease = await throttle.admit(REALM, batch=False, wait_seconds=0)
    taken = await taken_by_another_call(lease.slot)
    throttle.release_soon(lease)
    with pytest.raises(QuickBooksThrottled):
        await throttle.admit(REALM, batch=False, wait_seconds=0)
    assert await slot_lease(lease.slot) == taken

    # Given back on its own (here by the close, which gives back whatever is pending).
    await db.execute("UPDATE quickbooks_realm_throttles SET leases = '{}' WHERE realm_id = $1", REALM)
    lease = await throttle.admit(REALM, batch=False, wait_seconds=0)
    taken = await taken_by_another_call(lease.slot)
    throttle.release_soon(lease)
    await throttle.aclose()
    assert await slot_lease(lease.slot) == taken
