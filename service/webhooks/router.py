"""HTTP endpoints for outgoing webhooks: endpoints, their deliveries, and redelivery by hand.
Services only, with the scope webhooks:write."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from service.auth.dependencies import CurrentCaller
from service.connections.router import ERRORS, MALFORMED, Cursor, Limit
from service.connections.schemas import Page, TenantId
from service.core.db.engine import SessionDep
from service.core.errors import problem_responses
from service.runtime import RuntimeDep
from service.webhooks import repository as repo
from service.webhooks import service as webhooks
from service.webhooks.schemas import (
    DeliveryOut,
    Redelivered,
    SecretRotated,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointOut,
)

router = APIRouter(tags=["webhooks"])

EndpointID = Annotated[uuid.UUID, Path(description="The webhook endpoint's id.")]
EventID = Annotated[uuid.UUID, Path(description="The event's id (its `webhook-id`).")]
CONFLICT = problem_responses(409)


@router.post(
    "/webhook-endpoints",
    status_code=201,
    response_model=WebhookEndpointCreated,
    responses={**ERRORS, **MALFORMED, **CONFLICT},
    summary="Register a webhook endpoint (its secret is shown only in this answer)",
    description="422 `validation_error` for a URL that may not receive webhooks (not "
    "https, or a private, loopback, link-local or reserved address after "
    "DNS resolution); 409 `webhook_endpoint_limit_reached`.",
)
async def create_endpoint(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, body: WebhookEndpointCreate
) -> WebhookEndpointCreated:
    webhooks.require_webhooks_scope(caller)
    endpoint, secret = await webhooks.create(session, rt.settings, rt.box, body, caller=caller)
    shown = WebhookEndpointOut.of(endpoint, now=datetime.now(UTC))
    return WebhookEndpointCreated(**shown.model_dump(), secret=secret)


@router.get(
    "/webhook-endpoints",
    response_model=Page[WebhookEndpointOut],
    responses=ERRORS,
    summary="List webhook endpoints, newest first",
)
async def list_endpoints(
    session: SessionDep,
    caller: CurrentCaller,
    tenant_id: Annotated[
        TenantId | None, Query(description="Only the endpoints filtered to this tenant.")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[WebhookEndpointOut]:
    webhooks.require_webhooks_scope(caller)
    rows, next_cursor = await repo.list_endpoints(session, tenant_id=tenant_id, limit=limit, cursor=cursor)
    now = datetime.now(UTC)
    return Page[WebhookEndpointOut](
        items=[WebhookEndpointOut.of(e, now=now) for e in rows], next_cursor=next_cursor
    )


@router.delete(
    "/webhook-endpoints/{endpoint_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a webhook endpoint and its deliveries",
)
async def delete_endpoint(session: SessionDep, caller: CurrentCaller, endpoint_id: EndpointID) -> Response:
    webhooks.require_webhooks_scope(caller)
    await webhooks.delete(session, await webhooks.load(session, endpoint_id, for_update=True))
    return Response(status_code=204)


@router.post(
    "/webhook-endpoints/{endpoint_id}/rotate-secret",
    response_model=SecretRotated,
    responses=ERRORS,
    summary="A new signing secret; the previous one keeps signing for 24 hours",
)
async def rotate_secret(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, endpoint_id: EndpointID
) -> SecretRotated:
    webhooks.require_webhooks_scope(caller)
    endpoint = await webhooks.load(session, endpoint_id, for_update=True)
    secret, expires = await webhooks.rotate_secret(session, rt.box, endpoint)
    return SecretRotated(secret=secret, previous_secret_expires_at=expires)


@router.get(
    "/webhook-endpoints/{endpoint_id}/deliveries",
    response_model=Page[DeliveryOut],
    responses=ERRORS,
    summary="The endpoint's deliveries, newest first",
)
async def list_deliveries(
    session: SessionDep,
    caller: CurrentCaller,
    endpoint_id: EndpointID,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[DeliveryOut]:
    webhooks.require_webhooks_scope(caller)
    await webhooks.load(session, endpoint_id)
    rows, next_cursor = await repo.list_deliveries(
        session, endpoint_id=endpoint_id, limit=limit, cursor=cursor
    )
    return Page[DeliveryOut](items=[DeliveryOut.of(d, t) for d, t in rows], next_cursor=next_cursor)


@router.post(
    "/events/{event_id}/redeliver",
    status_code=202,
    response_model=Redelivered,
    responses=ERRORS,
    summary="Send an event again to every enabled endpoint it is for (or one)",
    description="The new deliveries carry the event's id as `webhook-id`, as the first did.",
)
async def redeliver(
    session: SessionDep,
    caller: CurrentCaller,
    event_id: EventID,
    endpoint_id: Annotated[uuid.UUID | None, Query(description="Only to this endpoint.")] = None,
) -> Redelivered:
    webhooks.require_webhooks_scope(caller)
    deliveries = await webhooks.redeliver(session, event_id=event_id, endpoint_id=endpoint_id)
    return Redelivered(items=[DeliveryOut.of(d, t) for d, t in deliveries])
