"""The JSON shapes of connections, events and link status (see openapi.yaml)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from service.core.db.models import Connection, ConnectionEvent, PendingLink
from service.domain import Status

TenantId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
]
UserId = TenantId


class AccountingLink(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuickBooksUserOut(BaseModel):
    sub: str
    email: str | None
    name: str | None


class Owner(BaseModel):
    user_id: str | None
    quickbooks_user: QuickBooksUserOut


class Modules(BaseModel):
    accounts_receivable: bool
    accounts_payable: bool


class PendingLinkOut(BaseModel):
    reasons: list[str]
    quickbooks_user: QuickBooksUserOut
    realm_id: str
    company_name: str | None
    expires_at: datetime


class LastError(BaseModel):
    code: str
    message: str | None
    at: datetime | None


class ConnectionOut(BaseModel):
    id: uuid.UUID
    tenant_id: str
    status: Status
    realm_id: str | None
    company_name: str | None
    owner: Owner | None
    modules: Modules
    accounting_link: AccountingLink
    pending_link: PendingLinkOut | None
    access_token_expires_at: datetime | None
    refresh_token_expires_at: datetime | None
    last_refreshed_at: datetime | None
    connected_at: datetime | None
    disconnected_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_error: LastError | None


def accounting_link(conn: Any) -> AccountingLink:
    on = conn.status == Status.CONNECTED and (conn.module_ar or conn.module_ap)
    return AccountingLink.ENABLED if on else AccountingLink.DISABLED


def owner_of(conn: Any) -> Owner | None:
    if conn.owner_qb_sub is None:
        return None
    return Owner(
        user_id=conn.owner_user_id,
        quickbooks_user=QuickBooksUserOut(
            sub=conn.owner_qb_sub, email=conn.owner_qb_email, name=conn.owner_qb_name
        ),
    )


def connection_out(conn: Connection, pending: PendingLink | None) -> ConnectionOut:
    return ConnectionOut(
        id=conn.id,
        tenant_id=conn.tenant_id,
        status=Status(conn.status),
        realm_id=conn.realm_id,
        company_name=conn.company_name,
        owner=owner_of(conn),
        modules=Modules(accounts_receivable=conn.module_ar, accounts_payable=conn.module_ap),
        accounting_link=accounting_link(conn),
        pending_link=None
        if pending is None
        else PendingLinkOut(
            reasons=list(pending.reasons),
            quickbooks_user=QuickBooksUserOut(
                sub=pending.qb_sub, email=pending.qb_email, name=pending.qb_name
            ),
            realm_id=pending.realm_id,
            company_name=pending.company_name,
            expires_at=pending.expires_at,
        ),
        access_token_expires_at=conn.access_token_expires_at,
        refresh_token_expires_at=conn.refresh_token_expires_at,
        last_refreshed_at=conn.last_refreshed_at,
        connected_at=conn.connected_at,
        disconnected_at=conn.disconnected_at,
        created_at=conn.created_at,
        updated_at=conn.updated_at,
        last_error=None
        if conn.last_error_code is None
        else LastError(code=conn.last_error_code, message=conn.last_error_message, at=conn.last_error_at),
    )


class ConnectionCreate(Strict):
    # A user's tenant comes from their JWT: the empty body is the usual request.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})

    tenant_id: TenantId | None = Field(
        default=None, description="Services only: the tenant the connection is for."
    )


class ModulesPatch(Strict):
    accounts_receivable: StrictBool | None = None
    accounts_payable: StrictBool | None = None


class ConnectionPatch(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"modules": {"accounts_receivable": True}}]}
    )

    modules: ModulesPatch


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


class EventOut(BaseModel):
    id: int
    connection_id: uuid.UUID
    type: str
    actor: str | None
    details: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: ConnectionEvent) -> EventOut:
        assert event.id is not None
        return cls(
            id=event.id,
            connection_id=event.connection_id,
            type=event.type,
            actor=event.actor,
            details=event.details,
            created_at=event.created_at,
        )


class ConnectionStatusOut(BaseModel):
    id: uuid.UUID
    status: Status
    realm_id: str | None
    company_name: str | None
    owner: Owner | None
    modules: Modules
    accounting_link: AccountingLink
    access_token_expires_at: datetime | None


class LinkStatusOut(BaseModel):
    tenant_id: str
    accounting_link: AccountingLink
    connections: list[ConnectionStatusOut]
