"""The broker's domain vocabulary, shared by every feature: a connection's statuses and the
associated data that binds each sealed secret to its row and purpose."""

from __future__ import annotations

import uuid
from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"
    CONNECTED = "connected"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    DISCONNECTED = "disconnected"


# Statuses in which a connection holds a QuickBooks company (one per company, as at Intuit).
LIVE_STATUSES = (Status.CONNECTED, Status.REAUTHORIZATION_REQUIRED)


class Sealed(StrEnum):
    """What a ciphertext holds; part of its associated data, so a secret moved to another column
    or row does not open."""

    ACCESS = "access"
    REFRESH = "refresh"
    PENDING_ACCESS = "pending-access"
    PENDING_REFRESH = "pending-refresh"
    HELD_ACCESS = "held-access"
    HELD_REFRESH = "held-refresh"


def sealed_aad(connection_id: uuid.UUID | str, purpose: Sealed) -> str:
    """The associated data of a connection's (or its pending link's, or held grant's) token."""
    return f"{connection_id}:{purpose.value}"


def revocation_aad(connection_id: uuid.UUID | str, revocation_id: uuid.UUID | str) -> str:
    """The associated data of a token queued for revocation."""
    return f"{connection_id}:revocation:{revocation_id}"
