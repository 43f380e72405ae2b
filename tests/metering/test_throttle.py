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


# Every admission by a statement, even where a finished call's slot could go to the next one.
NO_REUSE = {"BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS": 0}


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Throttles as replicas have them: each on a pool of its own; closed at the end."""
    made: list[tuple[RealmThrottle, asyncpg.Pool]] = []

    async def make(**settings: Any) -> RealmThrottle:
        pool = await create_asyncpg_pool(database_url, max_size=2)
        throttle = RealmThrottle(Settings(**{**ONE_SLOT, **settings}), pool)
        made.append((throttle, pool))
        return throttle

    yield make
    for throttle, pool in made:
        await throttle.aclose()
        await pool.close()


async def held(db: asyncpg.Connection) -> int:
    leases = await db.fetchval("SELECT leases FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM)
    return sum(1 for lease in leases or [] if lease is not None)


async def slot_lease(db: asyncpg.Connection, slot: int | None) -> Any:
    return await db.fetchval(
        "SELECT leases[$2] FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM, slot
    )


async def test_the_next_admission_takes_the_finished_calls_slot_back(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)  # only an admission gives it back
    throttle = await replicas(**NO_REUSE)
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
    # (A reused slot cannot have lapsed: it is reused only moments after its admission.)
    throttle = await replicas(**NO_REUSE)

    async def taken_by_another_call(slot: int | None) -> Any:
        # The lease lapsed (a stalled replica) and another replica's call took the slot.
        return await db.fetchval(
            "UPDATE quickbooks_realm_throttles SET leases[$2] = clock_timestamp() + interval '1 minute' "
            "WHERE realm_id = $1 RETURNING leases[$2]",
            REALM,
            slot,
        )

    # Carried by the next admission: the slot stays the other call's, so there is no room.
    lease = await throttle.admit(REALM, batch=False, wait_seconds=0)
    taken = await taken_by_another_call(lease.slot)
    throttle.release_soon(lease)
    with pytest.raises(QuickBooksThrottled):
        await throttle.admit(REALM, batch=False, wait_seconds=0)
    assert await slot_lease(db, lease.slot) == taken

    # Given back on its own (here by the close, which gives back whatever is pending).
    await db.execute("UPDATE quickbooks_realm_throttles SET leases = '{}' WHERE realm_id = $1", REALM)
    lease = await throttle.admit(REALM, batch=False, wait_seconds=0)
    taken = await taken_by_another_call(lease.slot)
    throttle.release_soon(lease)
    await throttle.aclose()
    assert await slot_lease(db, lease.slot) == taken


async def test_with_only_the_in_flight_limit_the_next_call_takes_the_slot_without_a_statement(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    one, other = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1), await replicas()
    first = await one.admit(REALM, batch=False, wait_seconds=0)
    one.release_soon(first)
    second = await one.admit(REALM, batch=False, wait_seconds=0)
    # The same lease, untouched in PostgreSQL: no statement gave it back and took it again.
    assert (second.slot, second.expires_at) == (first.slot, first.expires_at)
    assert await slot_lease(db, second.slot) == first.expires_at
    # Still held for every other replica, and given back as usual once the call is over.
    with pytest.raises(QuickBooksThrottled):
        await other.admit(REALM, batch=False, wait_seconds=0)
    one.release_soon(second)
    await one.aclose()
    assert await held(db) == 0


async def test_a_slot_is_reused_only_shortly_after_postgresql_admitted_on_it(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the reuse time the next call asks PostgreSQL again, where another replica's pause
    (or anything else the row says) is seen."""
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    throttle = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=0.05)
    first = await throttle.admit(REALM, batch=False, wait_seconds=0)
    throttle.release_soon(first)
    await asyncio.sleep(0.06)
    second = await throttle.admit(REALM, batch=False, wait_seconds=0)
    assert second.slot == first.slot and second.expires_at != first.expires_at
    assert await slot_lease(db, second.slot) == second.expires_at
    throttle.release_soon(second)

    other = await replicas()
    await other.pause(REALM, 5)
    await asyncio.sleep(0.06)
    with pytest.raises(QuickBooksThrottled):  # the pause, seen by the statement
        await throttle.admit(REALM, batch=False, wait_seconds=0)


async def test_a_429_seen_here_stops_reuse_at_once(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    throttle = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    lease = await throttle.admit(REALM, batch=False, wait_seconds=0)
    throttle.release_soon(lease)
    await throttle.pause(REALM, 5)
    with pytest.raises(QuickBooksThrottled):
        await throttle.admit(REALM, batch=False, wait_seconds=0)


@pytest.mark.parametrize(
    "limits",
    [
        {"BROKER_QUICKBOOKS_PER_SECOND": 1000},
        # The per-minute window alone (it would also set a pace of its own).
        {"BROKER_QUICKBOOKS_PER_MINUTE": 1000, "BROKER_QUICKBOOKS_MIN_INTERVAL_SECONDS": 0},
        {"BROKER_QUICKBOOKS_MIN_INTERVAL_SECONDS": 0.001},
    ],
    ids=["per-second", "per-minute", "pace"],
)
async def test_with_a_window_or_the_pace_on_every_call_has_its_statement(
    db: asyncpg.Connection,
    replicas: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, float],
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    throttle = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1, **limits)
    first = await throttle.admit(REALM, batch=False, wait_seconds=1)
    throttle.release_soon(first)
    second = await throttle.admit(REALM, batch=False, wait_seconds=1)
    # A new lease: a statement gave the slot back and took it again, stamping the call.
    assert second.slot == first.slot and second.expires_at != first.expires_at
    assert await slot_lease(db, second.slot) == second.expires_at
    throttle.release_soon(second)


async def test_reused_slots_never_let_more_calls_in_flight_than_the_limit(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    """Two replicas, callers back to back on one realm: slots pass from call to call inside a
    replica, and still no more than the limit are in flight at once, all replicas together."""
    limit = 3
    one = await replicas(BROKER_QUICKBOOKS_MAX_IN_FLIGHT=limit, BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    other = await replicas(BROKER_QUICKBOOKS_MAX_IN_FLIGHT=limit, BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    in_flight = most = calls = reused = 0
    slots: set[tuple[int | None, Any]] = set()
    seen: set[tuple[int | None, Any]] = set()

    async def caller(throttle: RealmThrottle) -> None:
        nonlocal in_flight, most, calls, reused
        for _ in range(15):
            lease = await throttle.admit(REALM, batch=False, wait_seconds=5)
            assert (lease.slot, lease.expires_at) not in slots  # nobody else's lease
            slots.add((lease.slot, lease.expires_at))
            reused += (lease.slot, lease.expires_at) in seen
            seen.add((lease.slot, lease.expires_at))
            in_flight += 1
            most = max(most, in_flight)
            calls += 1
            await asyncio.sleep(0.002)
            in_flight -= 1
            slots.discard((lease.slot, lease.expires_at))
            throttle.release_soon(lease)

    await asyncio.gather(*(caller(one if i % 2 else other) for i in range(8)))
    assert calls == 8 * 15 and most == limit
    assert reused > 0  # the slots did pass from call to call


async def test_batches_keep_their_statement_while_their_limit_is_on(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    throttle = await replicas(BROKER_QUICKBOOKS_BATCH_PER_MINUTE=120, BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    first = await throttle.admit(REALM, batch=True, wait_seconds=0)
    throttle.release_soon(first)
    second = await throttle.admit(REALM, batch=True, wait_seconds=0)
    assert second.slot == first.slot and second.expires_at != first.expires_at  # a statement
    batches = await db.fetchval(
        "SELECT cardinality(batch_admitted) FROM quickbooks_realm_throttles WHERE realm_id = $1", REALM
    )
    assert batches == 2
    throttle.release_soon(second)
    # A call that is not a batch takes the slot the batch finished with, as it is.
    other = await throttle.admit(REALM, batch=False, wait_seconds=0)
    assert (other.slot, other.expires_at) == (second.slot, second.expires_at)
    throttle.release_soon(other)


class _AnswerLost:
    """A pool whose next fetchrow runs its statement (which commits) and then fails, as when the
    connection drops while the answer comes back."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fetchrow(self, *args: Any) -> Any:
        await self._pool.fetchrow(*args)
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


async def test_a_slot_carried_by_a_statement_that_failed_is_never_reused(
    db: asyncpg.Connection, replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed statement freed the slot before it failed, and another replica took it: the
    replica that carried it must not hand it to its next call."""
    monkeypatch.setattr(throttle_module, "RETURN_SECONDS", 60.0)
    settings = {"BROKER_QUICKBOOKS_BATCH_PER_MINUTE": 1, "BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS": 1}
    one, other = await replicas(**settings), await replicas(**settings)
    batch = await one.admit(REALM, batch=True, wait_seconds=0)  # the minute's only batch
    one.release_soon(batch)
    lease = await one.admit(REALM, batch=False, wait_seconds=0)  # reused
    assert lease.expires_at == batch.expires_at
    one.release_soon(lease)
    # A batch carries the slot back (a batch is not given one by reuse): the statement frees
    # it, finds the batch window full, and its answer is lost.
    pool = one._pool
    one._pool = _AnswerLost(pool)  # type: ignore[assignment]
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await one.admit(REALM, batch=True, wait_seconds=0)
    one._pool = pool
    assert await held(db) == 0
    taken = await other.admit(REALM, batch=False, wait_seconds=0)
    assert taken.slot == lease.slot
    with pytest.raises(QuickBooksThrottled):  # the only slot is the other replica's
        await one.admit(REALM, batch=False, wait_seconds=0)
    other.release_soon(taken)


async def test_pauses_seen_here_are_forgotten_once_over(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    """A realm that was paused and went quiet leaves nothing behind; a shorter pause does not
    cut a longer one short."""
    quiet = "9341450000000002"
    throttle = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    try:
        await throttle.pause(quiet, 0.01)
        await throttle.pause(REALM, 5)
        await asyncio.sleep(0.02)
        await throttle.pause(REALM, 1)
        assert set(throttle._paused) == {REALM}
        assert throttle._paused[REALM] - asyncio.get_running_loop().time() > 4
    finally:
        await db.execute("DELETE FROM quickbooks_realm_throttles WHERE realm_id = $1", quiet)


async def test_admission_times_are_compressed_with_lz4_where_the_server_has_it(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    """Migration 0011: lz4 on a server built with it; elsewhere (the embedded server) the
    migration went through and the column keeps the default. Either way a company's 500 newest
    admissions are kept, compressed."""
    # Asked of the server another way than the migration asks it.
    try:
        await db.execute("CREATE TEMP TABLE lz4_probe (a int[] COMPRESSION lz4)")
        await db.execute("DROP TABLE lz4_probe")
        has_lz4 = True
    except asyncpg.FeatureNotSupportedError:
        has_lz4 = False
    methods = dict(
        await db.fetch(
            "SELECT attname, attcompression::text FROM pg_attribute "
            "WHERE attrelid = 'quickbooks_realm_throttles'::regclass "
            "AND attname IN ('admitted', 'batch_admitted')"
        )
    )
    assert methods == dict.fromkeys(("admitted", "batch_admitted"), "l" if has_lz4 else "")

    throttle = await replicas(
        BROKER_QUICKBOOKS_MAX_IN_FLIGHT=0,
        BROKER_QUICKBOOKS_PER_MINUTE=500,
        BROKER_QUICKBOOKS_MIN_INTERVAL_SECONDS=0,
    )
    for _ in range(500):
        await throttle.admit(REALM, batch=False, wait_seconds=0)
    row = await db.fetchrow(
        "SELECT cardinality(admitted) AS n, pg_column_size(admitted) AS stored, "
        "pg_column_compression(admitted) AS method FROM quickbooks_realm_throttles WHERE realm_id = $1",
        REALM,
    )
    assert row["n"] == 500 and row["stored"] < 500 * 8
    assert row["method"] == ("lz4" if has_lz4 else "pglz")


async def test_an_intuit_429_pauses_the_realm_for_its_retry_after_within_1_to_60_seconds(
    db: asyncpg.Connection, replicas: Callable[..., Any]
) -> None:
    throttle = await replicas()

    async def paused_for() -> float:
        return float(
            await db.fetchval(
                "SELECT extract(epoch FROM paused_until - clock_timestamp()) "
                "FROM quickbooks_realm_throttles WHERE realm_id = $1",
                REALM,
            )
        )

    await throttle.paused_by_intuit(REALM, None)
    assert 0.5 < await paused_for() <= 1.0
    await throttle.paused_by_intuit(REALM, 3600)
    assert 59 < await paused_for() <= 60


class _ReadOnly:
    async def execute(self, *args: Any) -> Any:
        raise asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")


async def test_a_pause_the_database_cannot_take_is_logged_and_the_call_goes_on(
    replicas: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Intuit's 429 is the call's answer; a failed pause must not turn it into an error."""
    throttle = await replicas(BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS=1)
    pool = throttle._pool
    throttle._pool = _ReadOnly()  # type: ignore[assignment]
    try:
        await throttle.paused_by_intuit(REALM, 5)
    finally:
        throttle._pool = pool
    assert "pause not stored (ReadOnlySQLTransactionError)" in caplog.text
    assert throttle._paused[REALM] - asyncio.get_running_loop().time() > 4  # no reuse here meanwhile
