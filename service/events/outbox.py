"""The outbox: public events written in the transaction of the change they describe.

A change that rolls back leaves no event; a committed event is announced on the PostgreSQL
channel `qbo_events` (payload `{"seq", "tenant_id", "connection_id", "type"}`, sent on commit)
so streams and the webhook sender wake at once.

`seq` is taken when the row is written, not when its transaction commits: two transactions can
commit out of `seq` order, so a reader that resumes after a `seq` must look a little behind it
(event ids make a re-read harmless).

Connection events are written from one place, `service.store.connections.add_event`, which
maps the audit trail's types to public ones (`public_event`); the refresher's single-statement
writes use `CONNECTION_STATE_SQL` to give the same `data`.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.domain import Status
from service.events.models import Event

CHANNEL = "qbo_events"


class EventType(StrEnum):
    CONNECTION_CREATED = "connection.created"
    CONNECTION_CONNECTED = "connection.connected"
    CONNECTION_LINK_REFUSED = "connection.link_refused"
    CONNECTION_PENDING_LINK_CREATED = "connection.pending_link_created"
    CONNECTION_PENDING_LINK_CONFIRMED = "connection.pending_link_confirmed"
    CONNECTION_PENDING_LINK_DECLINED = "connection.pending_link_declined"
    CONNECTION_PENDING_LINK_EXPIRED = "connection.pending_link_expired"
    CONNECTION_REAUTHORIZATION_REQUIRED = "connection.reauthorization_required"
    CONNECTION_DISCONNECTED = "connection.disconnected"
    CONNECTION_DELETED = "connection.deleted"
    CONNECTION_MODULES_CHANGED = "connection.modules_changed"
    QUICKBOOKS_ENTITY_CHANGED = "quickbooks.entity_changed"
    QUICKBOOKS_USAGE_THRESHOLD = "quickbooks.usage_threshold"


CONNECTION_CREATED = EventType.CONNECTION_CREATED
CONNECTION_CONNECTED = EventType.CONNECTION_CONNECTED
CONNECTION_LINK_REFUSED = EventType.CONNECTION_LINK_REFUSED
CONNECTION_PENDING_LINK_CREATED = EventType.CONNECTION_PENDING_LINK_CREATED
CONNECTION_PENDING_LINK_CONFIRMED = EventType.CONNECTION_PENDING_LINK_CONFIRMED
CONNECTION_PENDING_LINK_DECLINED = EventType.CONNECTION_PENDING_LINK_DECLINED
CONNECTION_PENDING_LINK_EXPIRED = EventType.CONNECTION_PENDING_LINK_EXPIRED
CONNECTION_REAUTHORIZATION_REQUIRED = EventType.CONNECTION_REAUTHORIZATION_REQUIRED
CONNECTION_DISCONNECTED = EventType.CONNECTION_DISCONNECTED
CONNECTION_DELETED = EventType.CONNECTION_DELETED
CONNECTION_MODULES_CHANGED = EventType.CONNECTION_MODULES_CHANGED
QUICKBOOKS_ENTITY_CHANGED = EventType.QUICKBOOKS_ENTITY_CHANGED
QUICKBOOKS_USAGE_THRESHOLD = EventType.QUICKBOOKS_USAGE_THRESHOLD

# The audit trail's event types (connection_events.type) that are public events too. The others
# (refreshed, revoked) are the broker's own business; refresh_failed is
# published by the refresher's statement itself (service.tokens.refresh).
_PUBLIC_OF_AUDIT: dict[str, EventType] = {
    "created": CONNECTION_CREATED,
    "linked": CONNECTION_CONNECTED,
    "link_refused": CONNECTION_LINK_REFUSED,
    "link_pending": CONNECTION_PENDING_LINK_CREATED,
    "pending_link_confirmed": CONNECTION_PENDING_LINK_CONFIRMED,
    "pending_link_declined": CONNECTION_PENDING_LINK_DECLINED,
    "pending_link_expired": CONNECTION_PENDING_LINK_EXPIRED,
    "disconnected": CONNECTION_DISCONNECTED,
    "modules_changed": CONNECTION_MODULES_CHANGED,
}
# Audit details that stay out of public events (who did it is the audit trail's).
_PRIVATE_DETAILS = frozenset({"revocation_queued"})


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


async def emit(
    session: AsyncSession,
    type_: str,
    *,
    tenant_id: str,
    connection_id: uuid.UUID | None,
    data: dict[str, Any],
) -> uuid.UUID:
    """Write one event in the session's transaction (it commits or rolls back with the change);
    returns its id. `data` must hold no secret; datetimes and UUIDs become strings."""
    event = Event(
        id=uuid.uuid4(),
        type=EventType(type_).value,
        occurred_at=datetime.now(UTC),
        tenant_id=tenant_id,
        connection_id=connection_id,
        data=json.loads(json.dumps(data, default=_plain)),
    )
    session.add(event)
    return event.id


def connection_state(conn: Any) -> dict[str, Any]:
    """The public state of a connection that every connection event carries, so a listener
    needs no read to show it. Mirrored in SQL by CONNECTION_STATE_SQL."""
    return {
        "status": str(conn.status),
        "accounting_link": (
            "enabled"
            if conn.status == Status.CONNECTED and (conn.module_ar or conn.module_ap)
            else "disabled"
        ),
        "realm_id": conn.realm_id,
        "company_name": conn.company_name,
        "modules": {"accounts_receivable": conn.module_ar, "accounts_payable": conn.module_ap},
        "last_error": None
        if conn.last_error_code is None
        else {"code": conn.last_error_code, "message": conn.last_error_message, "at": conn.last_error_at},
    }


# connection_state over a row `c` of connections, as jsonb (for single-statement writers).
CONNECTION_STATE_SQL = f"""jsonb_build_object(
  'status', c.status,
  'accounting_link', CASE WHEN c.status = '{Status.CONNECTED.value}' AND (c.module_ar OR c.module_ap)
                          THEN 'enabled' ELSE 'disabled' END,
  'realm_id', c.realm_id,
  'company_name', c.company_name,
  'modules', jsonb_build_object('accounts_receivable', c.module_ar,
                                'accounts_payable', c.module_ap),
  'last_error', CASE WHEN c.last_error_code IS NULL THEN NULL ELSE jsonb_build_object(
    'code', c.last_error_code, 'message', c.last_error_message,
    'at', to_char(c.last_error_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')) END)"""


def public_event(
    audit_type: str, conn: Any, details: dict[str, Any]
) -> tuple[EventType, dict[str, Any]] | None:
    """The public event of an audit event (its type and data), or None for the broker's own."""
    public = _PUBLIC_OF_AUDIT.get(audit_type)
    if public is None:
        return None
    shown = {k: v for k, v in details.items() if k not in _PRIVATE_DETAILS}
    fields: dict[str, Any]
    if audit_type == "linked":
        fields = {
            "owner": {"user_id": shown.get("user_id"), "quickbooks_user": shown.get("quickbooks_user")},
            "forced": shown.get("forced", False),
            "confirmed": shown.get("confirmed", False),
        }
    elif audit_type == "link_refused":
        fields = {"error": {"code": shown.get("code"), "message": shown.get("message")}}
    elif audit_type in ("link_pending", "pending_link_declined", "pending_link_expired"):
        fields = {"pending_link": shown}
    elif audit_type == "modules_changed":
        fields = {"changed": shown}
    else:
        fields = {}
    return public, {**fields, **connection_state(conn)}


async def emit_for_connection(session: AsyncSession, type_: str, conn: Any, **fields: Any) -> uuid.UUID:
    """An event about `conn`, carrying its public state and `fields`."""
    return await emit(
        session,
        type_,
        tenant_id=conn.tenant_id,
        connection_id=conn.id,
        data={**fields, **connection_state(conn)},
    )
