"""All SQL about webhook endpoints and their deliveries, for the API (the sender's statements:
service.events.repository)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.pagination import page, time_id_cursor, time_id_of
from service.events.models import Event, WebhookDelivery, WebhookEndpoint
from service.events.repository import DELIVERIES_CHANNEL

W = WebhookEndpoint.__table__.c  # type: ignore[attr-defined]
D = WebhookDelivery.__table__.c  # type: ignore[attr-defined]
EV = Event.__table__.c  # type: ignore[attr-defined]


async def count_endpoints(session: AsyncSession, *, tenant_id: str | None) -> int:
    stmt = (
        sa.select(sa.func.count())
        .select_from(WebhookEndpoint)
        .where(W.tenant_id.is_(None) if tenant_id is None else W.tenant_id == tenant_id)
    )
    return int((await session.execute(stmt)).scalar_one())


async def get_endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID, *, for_update: bool = False
) -> WebhookEndpoint | None:
    stmt = sa.select(WebhookEndpoint).where(W.id == endpoint_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_endpoints(
    session: AsyncSession, *, tenant_id: str | None, limit: int, cursor: str | None
) -> tuple[list[WebhookEndpoint], str | None]:
    stmt = sa.select(WebhookEndpoint).order_by(W.created_at.desc(), W.id.desc()).limit(limit + 1)
    if tenant_id is not None:
        stmt = stmt.where(W.tenant_id == tenant_id)
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(W.created_at, W.id) < sa.tuple_(*time_id_cursor(cursor)))
    rows = list((await session.execute(stmt)).scalars())
    return page(rows, limit, time_id_of)


async def list_deliveries(
    session: AsyncSession, *, endpoint_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[tuple[WebhookDelivery, str]], str | None]:
    stmt = (
        sa.select(WebhookDelivery, EV.type)
        .join(Event, EV.id == D.event_id)
        .where(D.endpoint_id == endpoint_id)
        .order_by(D.created_at.desc(), D.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        stmt = stmt.where(sa.tuple_(D.created_at, D.id) < sa.tuple_(*time_id_cursor(cursor)))
    rows: list[tuple[WebhookDelivery, str]] = [
        (row[0], row[1]) for row in (await session.execute(stmt)).all()
    ]
    return page(rows, limit, lambda row: time_id_of(row[0]))


async def cancel_pending(session: AsyncSession, endpoint_id: uuid.UUID) -> None:
    await session.execute(
        sa.update(WebhookDelivery)
        .where(D.endpoint_id == endpoint_id, D.status == "pending")
        .values(status="cancelled", next_attempt_at=None)
    )


async def event_exists(session: AsyncSession, event_id: uuid.UUID) -> bool:
    stmt = sa.select(sa.exists().where(EV.id == event_id))
    return bool((await session.execute(stmt)).scalar_one())


async def add_redeliveries(
    session: AsyncSession, *, event_id: uuid.UUID, endpoint_id: uuid.UUID | None
) -> list[tuple[WebhookDelivery, str]]:
    """A new delivery of the event, due now, for each enabled endpoint it is for (or just the
    named one); announced on the events channel so a sender starts at once."""
    matches = (
        sa.select(sa.func.gen_random_uuid(), W.id, EV.id, sa.func.now())
        .select_from(WebhookEndpoint)
        .join(Event, EV.id == event_id)
        .where(
            W.disabled_at.is_(None),
            sa.or_(W.tenant_id.is_(None), W.tenant_id == EV.tenant_id),
            sa.or_(W.event_types.is_(None), EV.type == sa.func.any(W.event_types)),
        )
    )
    if endpoint_id is not None:
        matches = matches.where(W.id == endpoint_id)
    inserted = await session.execute(
        sa.insert(WebhookDelivery)
        .from_select(["id", "endpoint_id", "event_id", "next_attempt_at"], matches)
        .returning(D.id)
    )
    ids = list(inserted.scalars())
    if ids:
        await session.execute(sa.select(sa.func.pg_notify(DELIVERIES_CHANNEL, "")))
    stmt = (
        sa.select(WebhookDelivery, EV.type)
        .join(Event, EV.id == D.event_id)
        .where(D.id.in_(ids))
        .order_by(D.id)
    )
    return [(row[0], row[1]) for row in (await session.execute(stmt)).all()]
