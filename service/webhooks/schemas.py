"""The JSON shapes of webhook endpoints and deliveries (see openapi.yaml)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from service.connections.schemas import Strict, TenantId
from service.events.destinations import MAX_URL_CHARS
from service.events.models import WebhookDelivery, WebhookEndpoint
from service.events.outbox import EventType

WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_CHARS)]


class WebhookEndpointCreate(Strict):
    url: WebhookUrl = Field(
        description="https URL of a public host (http and private hosts only "
        "with BROKER_WEBHOOK_ALLOW_PRIVATE=true)."
    )
    event_types: list[EventType] | None = Field(
        default=None,
        min_length=1,
        max_length=len(EventType),
        description="Only these event types; all when left out.",
    )
    tenant_id: TenantId | None = Field(
        default=None, description="Only this tenant's events; all when left out."
    )


class EndpointStatus(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class WebhookEndpointOut(BaseModel):
    id: uuid.UUID
    url: str
    event_types: list[EventType] | None
    tenant_id: str | None
    status: EndpointStatus
    disabled_at: datetime | None
    disabled_reason: str | None
    previous_secret_expires_at: datetime | None = Field(
        description="While a rotated-out secret still signs deliveries: until when."
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, endpoint: WebhookEndpoint, *, now: datetime) -> WebhookEndpointOut:
        expires = endpoint.previous_secret_expires_at
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            event_types=None
            if endpoint.event_types is None
            else [EventType(t) for t in endpoint.event_types],
            tenant_id=endpoint.tenant_id,
            status=EndpointStatus.ENABLED if endpoint.disabled_at is None else EndpointStatus.DISABLED,
            disabled_at=endpoint.disabled_at,
            disabled_reason=endpoint.disabled_reason,
            previous_secret_expires_at=expires if expires is not None and expires > now else None,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
        )


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(description="The signing secret (`whsec_…`), shown only now.")


class SecretRotated(BaseModel):
    secret: str = Field(description="The new signing secret (`whsec_…`), shown only now.")
    previous_secret_expires_at: datetime = Field(
        description="Until then deliveries carry a signature with the previous secret too."
    )


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryOut(BaseModel):
    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    status: DeliveryStatus
    attempts: int
    last_attempt_at: datetime | None
    last_status_code: int | None = Field(description="The endpoint's HTTP status, last attempt.")
    last_duration_ms: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, delivery: WebhookDelivery, event_type: str) -> DeliveryOut:
        return cls(
            id=delivery.id,
            endpoint_id=delivery.endpoint_id,
            event_id=delivery.event_id,
            event_type=event_type,
            status=DeliveryStatus(delivery.status),
            attempts=delivery.attempts,
            last_attempt_at=delivery.last_attempt_at,
            last_status_code=delivery.last_status_code,
            last_duration_ms=delivery.last_duration_ms,
            last_error=delivery.last_error,
            next_attempt_at=delivery.next_attempt_at,
            delivered_at=delivery.delivered_at,
            created_at=delivery.created_at,
        )


class Redelivered(BaseModel):
    items: list[DeliveryOut]
