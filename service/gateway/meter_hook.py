"""What the gateway asks of a meter of Intuit's call classes, and the meter it uses without one.

A meter classifies each call (`core`: data in; `coreplus`: data out), may refuse one before it
leaves (`admit` raises a 429 problem), and counts every request that reached Intuit, retries
included (`record`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

CallClass = Literal["core", "coreplus"]
Classify = Callable[[str, str, bytes | None], CallClass]


class Meter(Protocol):
    async def admit(self, tenant_id: str, realm_id: str, call_class: CallClass) -> None: ...

    async def record(self, tenant_id: str, realm_id: str, call_class: CallClass, outcome: str) -> None: ...


class NoMeter:
    """Counts nothing and refuses nothing."""

    async def admit(self, tenant_id: str, realm_id: str, call_class: CallClass) -> None:
        return None

    async def record(self, tenant_id: str, realm_id: str, call_class: CallClass, outcome: str) -> None:
        return None


def classify_by_method(method: str, path: str, body: bytes | None) -> CallClass:
    """A stand-in until a meter's own classification is wired: reads are data out."""
    return "coreplus" if method == "GET" else "core"
