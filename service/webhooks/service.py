"""The rules of webhook endpoints: who may manage them, what may receive, secrets and rotation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.callers import Caller, Scope
from service.core.config import Settings
from service.core.crypto import SecretBox
from service.core.errors import NotFound, ProblemError, ValidationFailed
from service.events import destinations, signing
from service.events.delivery import secret_associated_data
from service.events.models import WebhookDelivery, WebhookEndpoint
from service.store.connections import lock_tenant
from service.webhooks import repository as repo
from service.webhooks.schemas import WebhookEndpointCreate

ROTATION_OVERLAP = timedelta(hours=24)


class WebhookEndpointLimitReached(ProblemError):
    status = 409
    code = "webhook_endpoint_limit_reached"
    title = "Too many webhook endpoints"


def require_webhooks_scope(caller: Caller) -> None:
    caller.require_scope(Scope.WEBHOOKS_WRITE)


async def check_url(url: str, settings: Settings) -> None:
    """A URL fit to receive webhooks, or a 422 that says why (without echoing it)."""
    try:
        await destinations.resolve(url, allow_private=settings.webhook_allow_private)
    except destinations.DestinationRefused as exc:
        raise ValidationFailed(
            str(exc), errors=[{"loc": ["body", "url"], "msg": str(exc), "type": "value_error"}]
        ) from None


async def create(
    session: AsyncSession, settings: Settings, box: SecretBox, body: WebhookEndpointCreate, *, caller: Caller
) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (in clear, for the caller to keep; stored sealed)."""
    await check_url(body.url, settings)
    # Endpoints without a tenant count as one more "tenant"; the lock makes creates count in turn.
    await lock_tenant(session, f"webhooks:{body.tenant_id or ''}")
    limit = settings.webhook_max_endpoints_per_tenant
    if await repo.count_endpoints(session, tenant_id=body.tenant_id) >= limit:
        raise WebhookEndpointLimitReached(
            f"At most {limit} webhook endpoints per tenant (and {limit} for all tenants); "
            "delete one that is no longer used.",
            limit=limit,
        )
    event_types = None if body.event_types is None else sorted({t.value for t in body.event_types})
    endpoint = WebhookEndpoint(
        url=body.url, tenant_id=body.tenant_id, event_types=event_types, secret="", created_by=caller.actor
    )
    secret = signing.new_secret()
    endpoint.secret = box.encrypt(secret, secret_associated_data(endpoint.id, "secret"))
    session.add(endpoint)
    await session.flush()
    return endpoint, secret


async def load(session: AsyncSession, endpoint_id: uuid.UUID, *, for_update: bool = False) -> WebhookEndpoint:
    endpoint = await repo.get_endpoint(session, endpoint_id, for_update=for_update)
    if endpoint is None:
        raise NotFound("No such webhook endpoint.")
    return endpoint


async def rotate_secret(
    session: AsyncSession, box: SecretBox, endpoint: WebhookEndpoint
) -> tuple[str, datetime]:
    """A new secret; the current one keeps signing (beside it) for ROTATION_OVERLAP. A rotation
    during another one's overlap retires the oldest secret at once."""
    now = datetime.now(UTC)
    current = box.decrypt(endpoint.secret, secret_associated_data(endpoint.id, "secret"))
    secret = signing.new_secret()
    expires = now + ROTATION_OVERLAP
    endpoint.previous_secret = box.encrypt(current, secret_associated_data(endpoint.id, "previous_secret"))
    endpoint.previous_secret_expires_at = expires
    endpoint.secret = box.encrypt(secret, secret_associated_data(endpoint.id, "secret"))
    endpoint.updated_at = now
    await session.flush()
    return secret, expires


async def delete(session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    await session.delete(endpoint)  # its deliveries go with it (ON DELETE CASCADE)
    await session.flush()


async def redeliver(
    session: AsyncSession, *, event_id: uuid.UUID, endpoint_id: uuid.UUID | None
) -> list[tuple[WebhookDelivery, str]]:
    if not await repo.event_exists(session, event_id):
        raise NotFound("No such event.")
    if endpoint_id is not None:
        await load(session, endpoint_id)
    return await repo.add_redeliveries(session, event_id=event_id, endpoint_id=endpoint_id)
