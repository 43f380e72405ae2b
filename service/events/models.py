"""The events tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel

TZ = sa.DateTime(timezone=True)


class Event(SQLModel, table=True):
    """One public event. `id` is its public id; `seq` orders events as they were written."""

    __tablename__ = "events"
    __table_args__ = (sa.Index("ix_events_tenant_seq", "tenant_id", "seq"),
                      sa.Index("ix_events_connection_seq", "connection_id", "seq"))

    id: uuid.UUID = Field(primary_key=True)
    seq: int | None = Field(default=None, sa_column=sa.Column(
        sa.BigInteger, sa.Identity(always=True), nullable=False, unique=True))
    type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(TZ, nullable=False,
                                                      server_default=sa.func.now()))
    tenant_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    connection_id: uuid.UUID | None = Field(default=None,
                                            sa_column=sa.Column(pg.UUID(as_uuid=True)))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(pg.JSONB, nullable=False))
