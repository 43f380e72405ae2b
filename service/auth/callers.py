"""The authenticated caller, and what it may do with a tenant's connections."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from service.core.errors import Forbidden, NotFound, ValidationFailed


class Scope(StrEnum):
    STATUS_READ = "status:read"
    TOKENS_READ = "tokens:read"
    CONNECTIONS_WRITE = "connections:write"
    WEBHOOKS_WRITE = "webhooks:write"
    QUICKBOOKS_READ = "quickbooks:read"
    QUICKBOOKS_WRITE = "quickbooks:write"


@dataclass(frozen=True)
class Caller:
    """A signed-in cieTrade user (`kind="user"`) or an internal service (`kind="service"`)."""

    kind: Literal["user", "service"]
    subject: str
    tenant_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    api_key_id: uuid.UUID | None = None

    @property
    def is_user(self) -> bool:
        return self.kind == "user"

    @property
    def actor(self) -> str:
        return f"user:{self.subject}" if self.is_user else f"service:{self.subject}"

    def require_scope(self, *accepted: Scope) -> None:
        if self.is_user:
            raise Forbidden("This operation is for internal services only.")
        if not any(scope in self.scopes for scope in accepted):
            names = " or ".join(scope.value for scope in accepted)
            raise Forbidden(f"This API key lacks the scope {names}.")

    def can_read(self, tenant_id: str) -> None:
        """Raise NotFound (users) or Forbidden (services) unless the caller may read the tenant."""
        if self.is_user:
            if tenant_id != self.tenant_id:
                raise NotFound("No such connection.")
            return
        self.require_scope(Scope.STATUS_READ, Scope.CONNECTIONS_WRITE)

    def can_write(self, tenant_id: str) -> None:
        if self.is_user:
            if tenant_id != self.tenant_id:
                raise NotFound("No such connection.")
            return
        self.require_scope(Scope.CONNECTIONS_WRITE)

    def tenant_for_read(self, requested: str | None) -> str:
        """The tenant a list or status request is about."""
        if self.is_user:
            if requested is not None and requested != self.tenant_id:
                raise NotFound("No such tenant.")
            assert self.tenant_id is not None
            return self.tenant_id
        self.require_scope(Scope.STATUS_READ, Scope.CONNECTIONS_WRITE)
        if not requested:
            raise ValidationFailed(
                "A service must name the tenant: ?tenant_id=…",
                errors=[{"loc": ["query", "tenant_id"], "msg": "required", "type": "missing"}],
            )
        return requested

    def tenant_for_write(self, requested: str | None) -> str:
        if self.is_user:
            if requested is not None and requested != self.tenant_id:
                raise Forbidden("A user may only act on their own tenant.")
            assert self.tenant_id is not None
            return self.tenant_id
        self.require_scope(Scope.CONNECTIONS_WRITE)
        if not requested:
            raise ValidationFailed(
                "A service must name the tenant: tenant_id.",
                errors=[{"loc": ["body", "tenant_id"], "msg": "required", "type": "missing"}],
            )
        return requested

    def user_for_write(self, requested: str | None) -> str:
        """The cieTrade user who will sign in to Intuit for an authorization."""
        if self.is_user:
            return self.subject
        if not requested:
            raise ValidationFailed(
                "A service must name the cieTrade user: user_id.",
                errors=[{"loc": ["body", "user_id"], "msg": "required", "type": "missing"}],
            )
        return requested
