"""Where a webhook may be sent: https to public addresses only, checked when an endpoint is
registered and again, after DNS resolution, for every delivery (the request then goes to the
address that was checked, so a DNS answer that changes in between cannot redirect it).
`BROKER_WEBHOOK_ALLOW_PRIVATE=true` lifts both rules, for local receivers in development."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationRefused(Exception):
    """The URL may not receive webhooks; the message says why (it never echoes the URL)."""


@dataclass(frozen=True)
class Destination:
    """A URL checked for sending, and the address to send it to (None: as resolved by the
    client, when private destinations are allowed)."""

    url: str
    host: str
    port: int
    address: IPAddress | None


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def parse(url: str, *, allow_private: bool) -> tuple[str, int]:
    """The host and port of an acceptable URL, before any DNS lookup."""
    if len(url) > MAX_URL_CHARS:
        raise DestinationRefused(f"The URL is longer than {MAX_URL_CHARS} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DestinationRefused("The URL is not valid.") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise DestinationRefused("Webhook URLs must use https.")
    if not parts.hostname:
        raise DestinationRefused("The URL has no host.")
    if parts.username is not None or parts.password is not None:
        raise DestinationRefused("The URL must not carry credentials.")
    if parts.fragment:
        raise DestinationRefused("The URL must not have a fragment.")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise DestinationRefused("The URL must not contain whitespace or control characters.")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str, *, allow_private: bool) -> Destination:
    """Check a URL and resolve its host; every address it resolves to must be public."""
    host, port = parse(url, allow_private=allow_private)
    if allow_private:
        return Destination(url, host, port, None)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError):
            raise DestinationRefused("The URL's host does not resolve.") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not addresses:
            raise DestinationRefused("The URL's host does not resolve.")
    if not all(_public(a) for a in addresses):
        raise DestinationRefused(
            "The URL's host is a private, loopback, link-local or reserved "
            "address; webhooks go to public addresses only."
        )
    return Destination(url, host, port, addresses[0])
