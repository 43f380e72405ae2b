"""SpreadTransport against a real HTTP server (the emulator): requests go to the pool with the
fewest under way, so none waits for a connection while another pool has one free, and a pool's
count goes back down when an answer is read, closed or never comes."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from service.core.httpclient import SpreadTransport, environment_proxy
from tests.conftest import Stack


async def test_requests_spread_over_the_pools_and_are_counted_until_read(
    stack: Stack, emulator: httpx.AsyncClient
) -> None:
    await emulator.post("/_emulator/config", json={"latency_ms": 300})
    # Two pools of two connections; no waiting for a connection allowed.
    transport = SpreadTransport(httpx.Limits(max_connections=4, max_keepalive_connections=4), pools=2)
    async with httpx.AsyncClient(
        transport=transport, base_url=stack.emulator_url, timeout=httpx.Timeout(10, pool=0.05)
    ) as http:
        url = "/v3/company/1/companyinfo/1"  # any live call: the latency applies to it
        requests = [http.build_request("GET", url) for _ in range(4)]
        sent = [asyncio.create_task(http.send(r, stream=True)) for r in requests]
        await asyncio.sleep(0.1)
        assert transport.under_way == (2, 2)
        answers = await asyncio.gather(*sent)  # none timed out waiting for a connection
        assert transport.under_way == (2, 2)  # their answers are not read yet
        await answers[0].aread()
        await answers[1].aclose()
        assert sorted(transport.under_way) in ([0, 2], [1, 1])
        for answer in answers[2:]:
            await answer.aclose()
        assert transport.under_way == (0, 0)


async def test_a_request_that_fails_is_not_counted() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    transport = SpreadTransport(httpx.Limits(max_connections=4, max_keepalive_connections=4), pools=2)
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")
    assert transport.under_way == (0, 0)


def test_pools_are_sized_from_the_limits() -> None:
    transport = SpreadTransport(httpx.Limits(max_connections=100, max_keepalive_connections=50))
    assert len(transport.under_way) == 13  # 50 idle connections kept, four to a pool


QUICKBOOKS = "https://quickbooks.api.intuit.com"


@pytest.mark.parametrize(
    ("environment", "url", "expected"),
    [
        ({"HTTPS_PROXY": "http://egress:3128"}, QUICKBOOKS, "http://egress:3128"),
        ({"ALL_PROXY": "http://egress:3128"}, QUICKBOOKS, "http://egress:3128"),
        ({"HTTPS_PROXY": "http://egress:3128"}, "http://127.0.0.1:9100", None),
        (
            {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": ".intuit.com"},
            QUICKBOOKS,
            None,
        ),
        ({}, QUICKBOOKS, None),
    ],
)
def test_the_proxy_is_the_one_the_environment_names(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], url: str, expected: str | None
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert environment_proxy(url) == expected


async def test_requests_go_through_the_proxy_the_environment_names(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{unused.getsockname()[1]}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    url = f"{stack.emulator_url}/.well-known/openid_configuration"
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)

    async def get(transport: SpreadTransport) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, timeout=5) as http:
            return await http.get(url)

    with pytest.raises(httpx.ConnectError):  # through the proxy, which is down
        await get(SpreadTransport(limits))
    assert (await get(SpreadTransport(limits, trust_env=False))).status_code == 200
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert (await get(SpreadTransport(limits))).status_code == 200
