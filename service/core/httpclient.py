"""Outgoing HTTP connections spread over several small pools.

httpcore's pool looks at every connection it holds each time a request is added to it or
leaves it: it asks each idle one whether its socket has become readable (a `poll()` system
call apiece) and, for each connection, counts the idle ones again. With the 50 connections a
storm of refreshes (or a busy gateway) keeps open, that is thousands of checks and a few hundred
system calls per request, on the event loop (measured: 50 refreshes at once cost the event loop
about 2 ms of CPU each in one pool of 50, 0.8 ms in pools of 4). `SpreadTransport` keeps the same number of
connections in several pools of a few each and sends every request to the pool with the fewest
requests under way, so each of those scans covers a handful of connections, and no request
waits for a connection while another pool has one free.
"""

from __future__ import annotations

import math
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator

import httpx

# Connections per pool: small enough that a pool's scans stay short, large enough that a pool
# of them is not opened for every few requests.
CONNECTIONS_PER_POOL = 4


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, less
    NO_PROXY), as an httpx client that trusts the environment would use it; None: direct."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class SpreadTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, *, pools: int | None = None, proxy: str | None = None) -> None:
        total = limits.max_connections
        idle = limits.max_keepalive_connections
        if pools is None:
            pools = max(1, math.ceil((idle or total or CONNECTIONS_PER_POOL) / CONNECTIONS_PER_POOL))
        # One TLS context for all the pools: each would otherwise load the CA bundle again
        # (about 1 MB and 50 ms apiece).
        tls = httpx.create_ssl_context()
        self._pools = [
            httpx.AsyncHTTPTransport(
                verify=tls,
                proxy=proxy,
                limits=httpx.Limits(
                    max_connections=None if total is None else math.ceil(total / pools),
                    max_keepalive_connections=None if idle is None else math.ceil(idle / pools),
                    keepalive_expiry=limits.keepalive_expiry,
                ),
            )
            for _ in range(pools)
        ]
        self._under_way = [0] * pools

    @property
    def under_way(self) -> tuple[int, ...]:
        """Requests each pool has under way (sent, their answer not yet read or closed)."""
        return tuple(self._under_way)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        under_way = self._under_way
        index = under_way.index(min(under_way))
        under_way[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            under_way[index] -= 1
            raise
        # The connection stays taken until the answer has been read or closed.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Counted(response.stream, under_way, index)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Counted(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, under_way: list[int], index: int) -> None:
        self._stream = stream
        self._under_way = under_way
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._under_way[self._index] -= 1
        await self._stream.aclose()
