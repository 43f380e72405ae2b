"""The refresh decision taken under the row lock, in one statement: the same rule as the one a
waiting replica applies in Python to a row it read, and refresh attempts left behind recognised
whichever version of the broker recorded them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from itertools import product
from types import SimpleNamespace

import asyncpg

from service.core.db.engine import asyncpg_dsn
from service.store.connections import _due
from service.tokens.refresh import _Due
from tests.conftest import Stack, user_headers
from tests.support.db_helpers import execute, expire_access_token, fetchrow

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MOMENTS = [
    None,
    NOW - timedelta(hours=1),
    NOW,
    NOW + timedelta(minutes=4),
    NOW + timedelta(minutes=6),
    NOW + timedelta(hours=1),
]
RULES = [
    _Due(valid_until=NOW + timedelta(minutes=5)),  # a request
    _Due(valid_until=NOW + timedelta(minutes=5), refreshed_after=NOW - timedelta(minutes=1)),  # forced
    _Due(keepalive_by=NOW),  # keep-alive
    _Due(keepalive_by=NOW, valid_until=NOW + timedelta(minutes=10)),  # keep-alive, access tokens too
    _Due(),
]


async def test_the_rule_is_the_same_in_python_and_in_sql(stack) -> None:
    due = _due("$2::timestamptz", "$3::timestamptz", "$4::timestamptz")
    query = (
        f"SELECT {due} AS due FROM (SELECT $1::text AS access_token, "
        "$5::timestamptz AS access_token_expires_at, $6::timestamptz AS last_refreshed_at, "
        "$7::timestamptz AS keepalive_due_at) AS c"
    )
    db = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        checked = 0
        for rule, token, expires, refreshed, due in product(
            RULES, [None, "sealed"], MOMENTS, MOMENTS, MOMENTS
        ):
            row = SimpleNamespace(
                access_token=token,
                access_token_expires_at=expires,
                last_refreshed_at=refreshed,
                keepalive_due_at=due,
            )
            in_sql = await db.fetchval(query, token, *rule.args(), expires, refreshed, due)
            assert bool(in_sql) == rule(row), (rule, row)
            checked += 1
        assert checked == len(RULES) * 2 * len(MOMENTS) ** 3
    finally:
        await db.close()


async def test_an_attempt_left_behind_marks_the_token_lost(
    client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    row = await fetchrow(
        stack.database_url,
        "SELECT realm_id, refresh_token_issued_at FROM connections WHERE id = $1",
        cid,
    )
    assert row is not None
    # An attempt left behind by a process killed mid-refresh, naming the stored token.
    await execute(
        stack.database_url,
        "INSERT INTO refresh_attempts (connection_id, refresh_token_issued_at, actor) "
        "VALUES ($1, $2, 'request')",
        cid,
        row["refresh_token_issued_at"],
    )
    await emulator.post(f"/companies/{row['realm_id']}/disconnect")
    await expire_access_token(stack.database_url, cid)
    answer = await client.get(f"/connections/{cid}/token", headers=headers)
    assert answer.status_code == 409, answer.text
    body = (await client.get(f"/connections/{cid}", headers=user_headers())).json()
    assert body["last_error"]["code"] == "refresh_token_lost"
    left = await fetchrow(
        stack.database_url,
        "SELECT count(*) AS n FROM refresh_attempts WHERE connection_id = $1",
        cid,
    )
    assert left is not None and left["n"] == 0


async def test_decisions_gathered_in_one_statement_follow_each_ones_rule(
    runtime, linked_company, stack
) -> None:
    (due, _), (fresh, _), (forced, _) = [await linked_company(i) for i in (1, 2, 3)]
    await expire_access_token(stack.database_url, due)
    now = datetime.now(UTC)
    request = _Due(valid_until=now + timedelta(minutes=5))
    force = _Due(valid_until=now + timedelta(minutes=5), refreshed_after=now)
    decide = runtime.refresher._decide
    # Four decisions at once (one statement): each by its own rule, and None for no such row.
    rows = await asyncio.gather(
        decide(uuid.UUID(due), *request.args(), "request"),
        decide(uuid.UUID(fresh), *request.args(), "request"),
        decide(uuid.UUID(forced), *force.args(), "forced"),
        decide(uuid.uuid4(), *request.args(), "request"),
    )
    assert [row is not None and row.attempt is not None for row in rows] == [True, False, True, False]
    assert rows[3] is None
    recorded = await fetchrow(
        stack.database_url,
        "SELECT array_agg(actor ORDER BY actor) AS actors FROM refresh_attempts",
    )
    assert recorded is not None and recorded["actors"] == ["forced", "request"]


async def _issued_at(stack: Stack, *cids: str) -> dict[str, datetime | None]:
    """Each connection's refresh_token_issued_at: what a refresh of its stored token sends."""
    issued = {}
    for cid in cids:
        row = await fetchrow(
            stack.database_url, "SELECT refresh_token_issued_at AS t FROM connections WHERE id = $1", cid
        )
        assert row is not None
        issued[cid] = row["t"]
    return issued


async def test_outcomes_gathered_in_one_statement_store_only_rows_still_holding_the_sent_token(
    runtime, linked_company, stack
) -> None:
    (kept, _), (moved, _) = [await linked_company(i) for i in (1, 2)]
    sent = await _issued_at(stack, kept, moved)
    for cid in (kept, moved):
        await execute(
            stack.database_url,
            "INSERT INTO refresh_attempts (connection_id, refresh_token_issued_at, actor) "
            "VALUES ($1, $2, 'request')",
            cid,
            sent[cid],
        )
    # `moved` was linked anew after its refresh started: its row no longer holds the sent token.
    await execute(
        stack.database_url,
        "UPDATE connections SET refresh_token_issued_at = refresh_token_issued_at + interval '1 second' "
        "WHERE id = $1",
        moved,
    )
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)

    def store(cid: str, token: str) -> object:
        return runtime.refresher._outcomes._store(
            uuid.UUID(cid), sent.get(cid), "request", f"a-{token}", f"r-{token}", later, later, now, later
        )

    # Three outcomes at once (one statement): stored, superseded, no such connection.
    tenants = await asyncio.gather(store(kept, "k"), store(moved, "m"), store(str(uuid.uuid4()), "x"))
    assert tenants[0] is not None and tenants[1:] == [None, None]
    rows = {
        cid: await fetchrow(
            stack.database_url,
            "SELECT access_token, refresh_token_issued_at AS t, "
            "(SELECT count(*) FROM refresh_attempts WHERE connection_id = $1) AS attempts, "
            "(SELECT count(*) FROM connection_events WHERE connection_id = $1 AND type = 'refreshed') "
            "AS refreshed FROM connections WHERE id = $1",
            cid,
        )
        for cid in (kept, moved)
    }
    assert rows[kept]["access_token"] == "a-k" and rows[kept]["t"] == now  # type: ignore[index]
    assert (rows[kept]["attempts"], rows[kept]["refreshed"]) == (0, 1)  # type: ignore[index]
    assert rows[moved]["access_token"] != "a-m" and rows[moved]["t"] != now  # type: ignore[index]
    assert (rows[moved]["attempts"], rows[moved]["refreshed"]) == (1, 0)  # type: ignore[index]


async def test_a_row_another_transaction_holds_does_not_hold_up_the_other_outcomes(
    runtime, linked_company, stack
) -> None:
    (free, _), (held, _) = [await linked_company(i) for i in (1, 2)]
    sent = await _issued_at(stack, free, held)
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)

    outcomes = runtime.refresher._outcomes

    def store(cid: str) -> asyncio.Task[str | None]:
        # Through the retrying write, as a refresh stores its outcome (a slow machine's
        # lock_timeout in the waiting store is then retried, as in service).
        return asyncio.create_task(
            outcomes._write(
                SimpleNamespace(id=cid),
                lambda: outcomes._store(
                    uuid.UUID(cid), sent[cid], "request", f"a-{cid}", f"r-{cid}", later, later, now, later
                ),
            )
        )

    writer = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        transaction = writer.transaction()
        await transaction.start()
        # Another writer of `held` (a disconnect under way, say), not done yet.
        await writer.execute("SELECT 1 FROM connections WHERE id = $1 FOR NO KEY UPDATE", uuid.UUID(held))
        waiting, stored = store(held), store(free)
        assert await asyncio.wait_for(stored, timeout=10) is not None
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it waits for the row, and keeps its new tokens meanwhile
        await transaction.commit()
        assert await asyncio.wait_for(waiting, timeout=10) is not None
    finally:
        await writer.close()
    for cid in (free, held):
        row = await fetchrow(stack.database_url, "SELECT access_token FROM connections WHERE id = $1", cid)
        assert row is not None and row["access_token"] == f"a-{cid}"


async def test_two_outcomes_for_one_connection_at_once_get_their_own_answers(
    runtime, linked_company, stack
) -> None:
    cid, _ = await linked_company(1)
    sent = (await _issued_at(stack, cid))[cid]
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    outcomes = runtime.refresher._outcomes
    # Two refreshes of the same token whose answers come at once (only possible after a lock
    # session was lost): one is stored, the other is told it was superseded.
    tenants = await asyncio.gather(
        *(
            outcomes._store(uuid.UUID(cid), sent, "request", f"a-{n}", f"r-{n}", later, later, now, later)
            for n in (1, 2, 3)
        )
    )
    stored = [n for n, tenant in zip((1, 2, 3), tenants, strict=True) if tenant is not None]
    assert len(stored) == 1
    after = await fetchrow(stack.database_url, "SELECT access_token FROM connections WHERE id = $1", cid)
    assert after is not None and after["access_token"] == f"a-{stored[0]}"
