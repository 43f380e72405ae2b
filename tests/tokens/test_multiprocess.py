"""The token lifecycle across broker processes: one refresh per expiry however many replicas
ask, crashes mid-refresh, Intuit failures, and key rotation under load.

Brokers run as separate operating-system processes (tests/support/processes.py) against the
test database and the `stack` emulator; connections are linked through the in-thread broker
(the emulator's registered redirect URI), then served by the processes. Latency is injected at
the emulator so that requests really overlap.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.core.db.engine import asyncpg_dsn
from tests.conftest import COMPANY_1, ENCRYPTION_KEY, Stack, user_headers
from tests.support.db_helpers import expire_access_token, fetchrow
from tests.support.processes import BrokerProcess, BrokerProcesses, run_cli, settings_env
from tests.support.waiting import until

LOST = "qbo_broker_refresh_tokens_lost_total"
LOCK_WAITERS = (
    "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND datname = current_database()"
)


# A second encryption key: the rotation test's brokers encrypt under k2 and still read k1.
NEW_KEYS = f"k2:{base64.b64encode(os.urandom(32)).decode()},{ENCRYPTION_KEY}"


@dataclass
class Replicas:
    a: BrokerProcess
    b: BrokerProcess
    doomed: list[BrokerProcess]  # each is SIGKILLed by one test
    short_timeout: BrokerProcess  # INTUIT_TIMEOUT_SECONDS=1
    new_keys: tuple[BrokerProcess, BrokerProcess]  # BROKER_ENCRYPTION_KEYS=NEW_KEYS


@pytest.fixture(scope="module")
async def replicas(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicas]:
    """Every broker process the module needs, started together: a process takes seconds to
    start, and they start in parallel. Each test makes its own data; processes keep none."""
    processes = BrokerProcesses(tmp_path_factory.mktemp("brokers"))
    try:
        env = settings_env(stack.settings)
        started = [processes.spawn(name, env) for name in ("a", "b", "doomed-1", "doomed-2")]
        started.append(
            processes.spawn("short-timeout", settings_env(stack.settings, INTUIT_TIMEOUT_SECONDS=1))
        )
        new_keys_env = settings_env(stack.settings, BROKER_ENCRYPTION_KEYS=NEW_KEYS)
        started += [processes.spawn(name, new_keys_env) for name in ("k2-a", "k2-b")]
        await processes.ready(*started)
        a, b, doomed_1, doomed_2, short_timeout, k2_a, k2_b = started
        yield Replicas(a, b, [doomed_1, doomed_2], short_timeout, (k2_a, k2_b))
    finally:
        processes.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------


async def _link_many(
    linked_company: Callable[[int], Awaitable[tuple[str, str]]], count: int
) -> list[tuple[str, str]]:
    """`count` connections, each to its own QuickBooks company with its own admin."""
    gate = asyncio.Semaphore(6)

    async def one(index: int) -> tuple[str, str]:
        async with gate:
            return await linked_company(index)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _stats(emulator: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await emulator.get("/stats")).json())


def _refresh_outcomes(stats: dict[str, Any]) -> dict[str, int]:
    return dict(stats["token"].get("refresh_token", {}))


async def _metric(http: httpx.AsyncClient, broker: BrokerProcess, name: str, **labels: str) -> float | None:
    text = (await http.get(f"{broker.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def _connection(client: httpx.AsyncClient, cid: str) -> dict[str, Any]:
    return dict((await client.get(f"/connections/{cid}", headers=user_headers())).json())


async def _stored_tokens(stack: Stack, cid: str) -> dict[str, Any]:
    row = await fetchrow(
        stack.database_url, "SELECT access_token, refresh_token, status FROM connections WHERE id = $1", cid
    )
    assert row is not None
    return dict(row)


async def _works_at_intuit(http: httpx.AsyncClient, body: dict[str, Any]) -> bool:
    realm = body["realm_id"]
    info = await http.get(
        f"{body['api_base_url']}/v3/company/{realm}/companyinfo/{realm}",
        params={"minorversion": "75"},
        headers={"Authorization": f"Bearer {body['access_token']}", "Accept": "application/json"},
    )
    return info.status_code == 200


def _token_url(broker: BrokerProcess, cid: str) -> str:
    return f"{broker.url}/connections/{cid}/token"


# -- one refresh per expiry, across processes ------------------------------------------------


async def test_requests_across_two_processes_share_one_refresh(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    before = await _stored_tokens(stack, cid)
    await emulator.post("/config", json={"latency_ms": 200})
    await expire_access_token(stack.database_url, cid, seconds_left=10)

    brokers = (replicas.a, replicas.b)
    responses = await asyncio.gather(
        *(http.get(_token_url(brokers[i % 2], cid), headers=headers) for i in range(120))
    )

    assert [r.status_code for r in responses] == [200] * 120, [r.text for r in responses[:3]]
    tokens = {r.json()["access_token"] for r in responses}
    assert len(tokens) == 1
    stats = await _stats(emulator)
    assert _refresh_outcomes(stats) == {"ok": 1}  # one refresh, no invalid_grant, nothing else
    assert stats["max_concurrent_refresh"] == {COMPANY_1: 1}
    after = await _stored_tokens(stack, cid)
    assert after["status"] == "connected"
    assert after["refresh_token"] != before["refresh_token"]  # the rotated one was kept
    await emulator.post("/config", json={"latency_ms": 0})
    assert await _works_at_intuit(http, responses[0].json())
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert [e["type"] for e in events["items"]].count("refreshed") == 1
    unsettled = await fetchrow(
        stack.database_url,
        "SELECT count(*) AS n FROM refresh_attempts WHERE connection_id = $1",
        cid,
    )
    assert unsettled["n"] == 0  # settled with the outcome, so gone


async def test_fifty_expired_connections_are_refreshed_once_each(
    replicas, http, linked_company, service_headers, emulator, stack
) -> None:
    links = await _link_many(linked_company, 50)
    headers = await service_headers("tokens:read")
    for cid, _ in links:
        await expire_access_token(stack.database_url, cid, seconds_left=10)
    await emulator.post("/config", json={"latency_ms": 200})

    # Two requests per connection, one to each process, all at once.
    requests = [(cid, broker) for cid, _ in links for broker in (replicas.a, replicas.b)]
    responses = await asyncio.gather(
        *(http.get(_token_url(broker, cid), headers=headers) for cid, broker in requests)
    )

    assert {r.status_code for r in responses} == {200}, [r.text for r in responses if r.status_code != 200][
        :3
    ]
    served: dict[str, set[str]] = {}
    for (cid, _), response in zip(requests, responses, strict=True):
        served.setdefault(cid, set()).add(response.json()["access_token"])
    assert all(len(tokens) == 1 for tokens in served.values())
    assert len(set().union(*served.values())) == 50
    stats = await _stats(emulator)
    assert _refresh_outcomes(stats) == {"ok": 50}
    assert {realm: stats["refresh_by_realm"][realm] for _, realm in links} == {
        realm: {"ok": 1} for _, realm in links
    }
    assert set(stats["max_concurrent_refresh"].values()) == {1}


# -- crashes ---------------------------------------------------------------------------------


async def test_process_killed_mid_refresh_leaves_nothing_stuck_and_reports_the_lost_token(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    doomed, survivor = replicas.doomed.pop(), replicas.b
    cid = await linked()
    headers = await service_headers("tokens:read")
    before = await _stored_tokens(stack, cid)
    lost_before = await _metric(http, survivor, LOST)
    await emulator.post("/config", json={"latency_ms": 2000})
    await expire_access_token(stack.database_url, cid, seconds_left=10)

    doomed_request = asyncio.create_task(http.get(_token_url(doomed, cid), headers=headers))

    async def refresh_in_flight() -> bool:
        return (await _stats(emulator))["in_flight_refresh"].get(COMPANY_1) == 1

    await until(refresh_in_flight, "the doomed process's refresh to reach Intuit")
    doomed.kill()
    with pytest.raises(httpx.TransportError):
        await doomed_request

    # What Intuit (the emulator) does with a refresh whose client vanished: it still rotates.
    async def rotated() -> bool:
        return _refresh_outcomes(await _stats(emulator)).get("ok") == 1

    await until(rotated, "the emulator to finish the abandoned refresh")

    started = time.monotonic()
    answer = await http.get(_token_url(survivor, cid), headers=headers)
    assert time.monotonic() - started < 6  # its refresh lock died with its session
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "reauthorization_required"
    # The survivor spent the only refresh token it had; Intuit had already replaced it.
    assert _refresh_outcomes(await _stats(emulator)) == {"ok": 1, "invalid_grant": 1}
    body = await _connection(client, cid)
    assert body["status"] == "reauthorization_required"
    assert body["last_error"]["code"] == "refresh_token_lost"
    assert await _metric(http, survivor, LOST) == (lost_before or 0) + 1
    after = await _stored_tokens(stack, cid)
    assert (after["access_token"], after["refresh_token"]) == (
        before["access_token"],
        before["refresh_token"],
    )
    events = (await client.get(f"/connections/{cid}/events", headers=user_headers())).json()
    assert events["items"][0]["type"] == "refresh_failed"
    assert events["items"][0]["details"]["code"] == "refresh_token_lost"
    assert events["items"][0]["details"]["intuit_tid"]  # of the refusal that revealed the loss
    # Final: the next caller is told at once, without spending anything at Intuit.
    again = await http.get(_token_url(survivor, cid), headers=headers)
    assert again.json()["code"] == "reauthorization_required"
    assert _refresh_outcomes(await _stats(emulator)) == {"ok": 1, "invalid_grant": 1}


async def test_process_killed_before_its_refresh_left_loses_nothing(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    doomed, survivor = replicas.doomed.pop(), replicas.b
    cid = await linked()
    headers = await service_headers("tokens:read")
    before = await _stored_tokens(stack, cid)
    lost_before = await _metric(http, survivor, LOST)
    await expire_access_token(stack.database_url, cid, seconds_left=10)

    # A third party holds the row lock, so the doomed process's refresh waits for it.
    holder = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", cid)
        doomed_request = asyncio.create_task(http.get(_token_url(doomed, cid), headers=headers))

        async def doomed_waits() -> bool:
            # From another connection: a transaction sees pg_stat_activity frozen at first use.
            waiting = await fetchrow(stack.database_url, LOCK_WAITERS)
            return waiting is not None and int(waiting["n"]) >= 1

        await until(doomed_waits, "the doomed process to wait for the row lock")
        doomed.kill()
        with pytest.raises(httpx.TransportError):
            await doomed_request
        await hold.rollback()
    finally:
        await holder.close()

    started = time.monotonic()
    answer = await http.get(_token_url(survivor, cid), headers=headers)
    assert time.monotonic() - started < 5
    assert answer.status_code == 200, answer.text
    assert _refresh_outcomes(await _stats(emulator)) == {"ok": 1}  # the survivor's only
    assert (await _connection(client, cid))["status"] == "connected"
    assert await _metric(http, survivor, LOST) == (lost_before or 0)
    assert (await _stored_tokens(stack, cid))["refresh_token"] != before["refresh_token"]
    assert await _works_at_intuit(http, answer.json())


# -- Intuit failing --------------------------------------------------------------------------


async def test_intuit_503_and_429_change_nothing_and_are_retried_a_bounded_number_of_times(
    replicas, http, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    attempts = stack.settings.intuit_max_attempts
    await expire_access_token(stack.database_url, cid, seconds_left=10)
    row_sql = "SELECT * FROM connections WHERE id = $1"
    for status in (503, 429):
        stored = await fetchrow(stack.database_url, row_sql, cid)
        fired_before = (await _stats(emulator))["faults_fired"].get("token", 0)
        await emulator.post(
            "/faults", json={"endpoint": "token", "kind": "status", "status": status, "count": 10}
        )
        response = await http.get(_token_url(replicas.a, cid), headers=headers)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "intuit_unavailable"
        assert int(response.headers["retry-after"]) > 0
        assert dict(await fetchrow(stack.database_url, row_sql, cid)) == dict(stored)
        stats = await _stats(emulator)
        assert stats["faults_fired"]["token"] - fired_before == attempts
        assert _refresh_outcomes(stats).get(f"status_{status}") == attempts
        await emulator.delete("/faults")
    # The credentials were kept intact: the other process refreshes with them.
    recovered = await http.get(_token_url(replicas.b, cid), headers=headers)
    assert recovered.status_code == 200, recovered.text
    assert _refresh_outcomes(await _stats(emulator)) == {
        "status_503": attempts,
        "status_429": attempts,
        "ok": 1,
    }


async def test_timeouts_are_reported_as_what_really_happened_at_intuit(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    slow, other = replicas.short_timeout, replicas.b  # slow times out after 1 s
    cid = await linked()
    headers = await service_headers("tokens:read")
    attempts = stack.settings.intuit_max_attempts
    lost_before = await _metric(http, other, LOST)

    # One attempt times out (Intuit answers after 2 s, too late), the retry gets through: the
    # retry rotated first, so the late original finds its token dead. Nothing is lost.
    await expire_access_token(stack.database_url, cid, seconds_left=10)
    await emulator.post("/faults", json={"endpoint": "token", "kind": "timeout", "delay_s": 2, "count": 1})
    recovered = await http.get(_token_url(slow, cid), headers=headers)
    assert recovered.status_code == 200, recovered.text
    assert await _works_at_intuit(http, recovered.json())

    async def late_original_refused() -> bool:
        return _refresh_outcomes(await _stats(emulator)) == {"ok": 1, "invalid_grant": 1}

    await until(late_original_refused, "the timed-out refresh to be refused")
    assert (await _connection(client, cid))["status"] == "connected"

    # Every attempt times out: the first one did rotate at Intuit, after the broker gave up.
    await expire_access_token(stack.database_url, cid, seconds_left=10)
    stored = await _stored_tokens(stack, cid)
    await emulator.post(
        "/faults", json={"endpoint": "token", "kind": "timeout", "delay_s": 2, "count": attempts}
    )
    response = await http.get(_token_url(slow, cid), headers=headers)
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "intuit_unavailable"
    assert int(response.headers["retry-after"]) > 0
    assert await _stored_tokens(stack, cid) == stored

    async def all_attempts_done() -> bool:
        return _refresh_outcomes(await _stats(emulator)) == {"ok": 2, "invalid_grant": attempts}

    await until(all_attempts_done, "the timed-out refreshes to finish at the emulator")
    # An outage in between (Intuit never sees those requests) does not make the broker forget.
    await emulator.post(
        "/faults", json={"endpoint": "token", "kind": "status", "status": 503, "count": attempts}
    )
    outage = await http.get(_token_url(other, cid), headers=headers)
    assert outage.json()["code"] == "intuit_unavailable"
    # The stored refresh token is dead now; the next refresh (on another process) finds out,
    # and says what happened instead of blaming a disconnect in QuickBooks.
    answer = await http.get(_token_url(other, cid), headers=headers)
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "reauthorization_required"
    body = await _connection(client, cid)
    assert body["status"] == "reauthorization_required"
    assert body["last_error"]["code"] == "refresh_token_lost"
    assert await _metric(http, other, LOST) == (lost_before or 0) + 1
    stored_after = await _stored_tokens(stack, cid)
    assert stored_after["refresh_token"] == stored["refresh_token"]
    assert _refresh_outcomes(await _stats(emulator)) == {
        "ok": 2,
        "invalid_grant": attempts + 1,
        "status_503": attempts,
    }


async def test_an_answer_lost_early_in_the_retries_is_not_forgotten_by_a_later_one(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    lost_before = await _metric(http, replicas.short_timeout, LOST)
    await expire_access_token(stack.database_url, cid, seconds_left=10)
    # Attempt 1 times out (Intuit rotates at 2 s, unheard); attempt 2 gets 429 "retry after
    # 2 s"; attempt 3 then offers the rotated-away token and gets invalid_grant.
    await emulator.post("/faults", json={"endpoint": "token", "kind": "timeout", "delay_s": 2})
    await emulator.post("/faults", json={"endpoint": "token", "kind": "status", "status": 429, "delay_s": 2})
    answer = await http.get(_token_url(replicas.short_timeout, cid), headers=headers)
    assert answer.status_code == 409, answer.text
    assert _refresh_outcomes(await _stats(emulator)) == {"ok": 1, "status_429": 1, "invalid_grant": 1}
    assert (await _connection(client, cid))["last_error"]["code"] == "refresh_token_lost"
    assert await _metric(http, replicas.short_timeout, LOST) == (lost_before or 0) + 1


async def test_invalid_grant_is_asked_once_across_processes(
    replicas, http, client, linked, service_headers, emulator, stack
) -> None:
    cid = await linked()
    headers = await service_headers("tokens:read")
    before = await _stored_tokens(stack, cid)
    lost_before = [await _metric(http, b, LOST) for b in (replicas.a, replicas.b)]
    await emulator.post(f"/companies/{COMPANY_1}/disconnect")  # the user did it in QuickBooks
    await emulator.post("/config", json={"latency_ms": 200})
    await expire_access_token(stack.database_url, cid, seconds_left=10)

    brokers = (replicas.a, replicas.b)
    responses = await asyncio.gather(
        *(http.get(_token_url(brokers[i % 2], cid), headers=headers) for i in range(20))
    )

    assert {r.status_code for r in responses} == {409}
    assert {r.json()["code"] for r in responses} == {"reauthorization_required"}
    assert _refresh_outcomes(await _stats(emulator)) == {"invalid_grant": 1}
    body = await _connection(client, cid)
    assert body["status"] == "reauthorization_required"
    assert body["last_error"]["code"] == "invalid_grant"  # nothing was lost: it was revoked
    after = await _stored_tokens(stack, cid)
    assert (after["access_token"], after["refresh_token"]) == (
        before["access_token"],
        before["refresh_token"],
    )
    assert [await _metric(http, b, LOST) for b in brokers] == lost_before
    later = await http.get(_token_url(replicas.b, cid), headers=headers)
    assert later.json()["code"] == "reauthorization_required"
    assert _refresh_outcomes(await _stats(emulator)) == {"invalid_grant": 1}


# -- key rotation ----------------------------------------------------------------------------


async def test_key_rotation_under_concurrent_reads_on_two_processes(
    replicas, tmp_path, http, linked_company, service_headers, emulator, stack
) -> None:
    # Written by the in-thread broker, whose only key is k1.
    links = await _link_many(linked_company, 8)
    headers = await service_headers("tokens:read")
    ids = [cid for cid, _ in links]
    key_count = (
        "SELECT count(*) FILTER (WHERE access_token LIKE $1) + "
        "count(*) FILTER (WHERE refresh_token LIKE $1) AS n FROM connections"
    )
    assert (await fetchrow(stack.database_url, key_count, "k1.%"))["n"] == 16
    first, second = replicas.new_keys  # k2 first: they encrypt under k2 and still read k1
    await expire_access_token(stack.database_url, ids[0], seconds_left=10)  # one refresh too
    await emulator.post("/config", json={"latency_ms": 50})

    rotation = asyncio.create_task(
        run_cli(
            ["rotate-keys", "--batch", "1"],
            {"DATABASE_URL": stack.database_url, "BROKER_ENCRYPTION_KEYS": NEW_KEYS},
            tmp_path,
        )
    )
    served: list[tuple[str, int, str]] = []

    async def reader(worker: int) -> None:
        turn = worker
        while not rotation.done() or len(served) < 200:
            cid, broker = ids[turn % len(ids)], (first, second)[turn % 2]
            turn += 5
            response = await http.get(_token_url(broker, cid), headers=headers)
            served.append(
                (
                    cid,
                    response.status_code,
                    response.text if response.status_code != 200 else response.json()["access_token"],
                )
            )

    await asyncio.gather(*(reader(w) for w in range(6)))
    result = await rotation

    assert result.returncode == 0, result.stderr
    assert "under key k2" in result.stdout
    assert [s for s in served if s[1] != 200] == []
    by_connection: dict[str, set[str]] = {}
    for cid, _, token in served:
        by_connection.setdefault(cid, set()).add(token)
    assert all(len(tokens) == 1 for tokens in by_connection.values())  # same secret, either key
    assert (await fetchrow(stack.database_url, key_count, "k1.%"))["n"] == 0
    assert (await fetchrow(stack.database_url, key_count, "k2.%"))["n"] == 16
    for broker in (first, second):
        assert await _metric(http, broker, "qbo_broker_encrypted_secrets", key_id="k2") == 16
        assert not await _metric(http, broker, "qbo_broker_encrypted_secrets", key_id="k1")
