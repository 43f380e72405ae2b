"""Outgoing HTTP connections spread over several small pools.

httpcore's pool looks at every connection it holds each time a request is added to it or
leaves it: it asks each idle one whether its socket has become readable (a `poll()` system
call apiece) and, for each connection, counts the idle ones again. With the 50 connections a
storm of refreshes (or a busy gateway) keeps open, that is thousands of checks and a few hundred
system calls per request, on the event loop (`bench/intuit_pool.py`: 50 refreshes at once cost
1.6–2.0 ms of CPU each in one pool of 50, 1.0–1.3 ms in pools of four). `SpreadTransport` keeps
the same number of connections in several pools of a few each and sends every request to the
pool with the fewest requests under way, so each of those scans covers a handful of connections,
and no request waits for a connection while another pool has one free.
"""

from __future__ import annotations

import math
import ssl
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


class _Pools:
    """Pools of connections through one proxy (or direct), and the requests each has under way."""

    def __init__(self, limits: httpx.Limits, pools: int, tls: ssl.SSLContext, proxy: str | None) -> None:
        total, idle = limits.max_connections, limits.max_keepalive_connections
        self.transports = [
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
        self.under_way = [0] * pools


class SpreadTransport(httpx.AsyncBaseTransport):
    """`limits` for all the pools together. With `trust_env`, a request goes through the proxy
    the environment names for its host (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, less NO_PROXY), as
    an httpx client's would: a proxy's connections are pools of their own."""

    def __init__(self, limits: httpx.Limits, *, pools: int | None = None, trust_env: bool = True) -> None:
        total, idle = limits.max_connections, limits.max_keepalive_connections
        if pools is None:
            pools = max(1, math.ceil((idle or total or CONNECTIONS_PER_POOL) / CONNECTIONS_PER_POOL))
        self._limits, self._count, self._trust_env = limits, pools, trust_env
        # One TLS context for all the pools: each would otherwise load the CA bundle again
        # (about 1 MB and 50 ms apiece).
        self._tls = httpx.create_ssl_context()
        self._direct = _Pools(limits, pools, self._tls, None)
        self._through: dict[str, _Pools] = {}  # by proxy
        self._routes: dict[tuple[str, str, int | None], str | None] = {}  # origin -> proxy

    @property
    def under_way(self) -> tuple[int, ...]:
        """Requests each direct pool has under way (sent, their answer not yet read or closed)."""
        return tuple(self._direct.under_way)

    def _pools_for(self, url: httpx.URL) -> _Pools:
        if not self._trust_env:
            return self._direct
        origin = (url.scheme, url.host, url.port)
        if origin in self._routes:
            proxy = self._routes[origin]
        else:
            proxy = self._routes[origin] = environment_proxy(str(url))
        if proxy is None:
            return self._direct
        pools = self._through.get(proxy)
        if pools is None:
            pools = self._through[proxy] = _Pools(self._limits, self._count, self._tls, proxy)
        return pools

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pools = self._pools_for(request.url)
        under_way = pools.under_way
        index = under_way.index(min(under_way))
        under_way[index] += 1
        try:
            response = await pools.transports[index].handle_async_request(request)
        except BaseException:
            under_way[index] -= 1
            raise
        # The connection stays taken until the answer has been read or closed.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Counted(response.stream, under_way, index)
        return response

    async def aclose(self) -> None:
        for pools in (self._direct, *self._through.values()):
            for transport in pools.transports:
                await transport.aclose()


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
