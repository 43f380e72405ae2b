"""The control API under `/_emulator/` that tests (and curious humans) use to steer the emulator.

Not part of Intuit and unauthenticated by design: the emulator only ever runs locally. It can
reset to the seed, add users and companies, play "the user disconnected the app inside
QuickBooks", change token lifetimes, latency, Accounting API throttles and report size, queue
faults, read counters (including what Accounting API callers did: `accounting` in stats), and
point Intuit's webhooks at an endpoint (`/_emulator/webhooks`) and read what was delivered.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, model_validator

from .faults import Fault
from .flow import SESSION_COOKIE
from .state import Company, Store, User, iso

Role = Literal["master_admin", "company_admin", "standard"]


class NewUser(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    given_name: str
    family_name: str
    sub: str | None = Field(default=None, min_length=1, max_length=100)
    companies: dict[str, Role] = Field(default_factory=dict)


class RolesUpdate(BaseModel):
    # A null role removes the user from that company.
    companies: dict[str, Role | None]


class NewCompany(BaseModel):
    name: str = Field(min_length=1)
    realm_id: str | None = Field(default=None, pattern=r"^\d{10,19}$")
    legal_name: str | None = None
    country: str = "US"


class ConfigUpdate(BaseModel):
    access_token_ttl: int | None = Field(default=None, ge=1)
    refresh_token_ttl: int | None = Field(default=None, ge=1)
    code_ttl: int | None = Field(default=None, ge=1)
    latency_ms: int | None = Field(default=None, ge=0)
    # Accounting API throttles per company and app (0: no limit) and generated report size.
    throttle_concurrent: int | None = Field(default=None, ge=0)
    throttle_per_second: int | None = Field(default=None, ge=0)
    throttle_per_minute: int | None = Field(default=None, ge=0)
    throttle_batch_per_minute: int | None = Field(default=None, ge=0)
    report_rows: int | None = Field(default=None, ge=0, le=5_000_000)


class WebhookUpdate(BaseModel):
    """Where and how the emulator sends webhooks; keys left out keep their value, a null `url`
    stops sending."""

    url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$", max_length=2000)
    verifier_token: str | None = Field(default=None, min_length=1, max_length=500)
    format: Literal["legacy", "cloudevents", "both"] | None = None
    batch_window_s: float | None = Field(default=None, ge=0, le=60)
    duplicate_probability: float | None = Field(default=None, ge=0, le=1)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
    retry_delay_s: float | None = Field(default=None, ge=0, le=60)


class FaultSpec(BaseModel):
    endpoint: Literal["token", "revoke", "userinfo", "companyinfo", "accounting"]
    kind: Literal["status", "timeout", "drop_after_rotate", "drop_after_commit"]
    status: int | None = Field(default=None, ge=400, le=599)
    count: int = Field(default=1, ge=1)
    delay_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        if self.kind == "drop_after_rotate" and self.endpoint != "token":
            raise ValueError("drop_after_rotate only applies to the token endpoint")
        if self.kind == "drop_after_commit" and self.endpoint != "accounting":
            raise ValueError("drop_after_commit only applies to the accounting endpoint")
        return self


class SigninRequest(BaseModel):
    email: str


class ClockAdvance(BaseModel):
    # Moves the emulator's clock forward (e.g. past a refresh token's 100 days).
    advance_s: float = Field(ge=0)


def user_view(user: User) -> dict[str, Any]:
    return {
        "sub": user.sub,
        "email": user.email,
        "given_name": user.given_name,
        "family_name": user.family_name,
        "name": user.name,
        "email_verified": user.email_verified,
        "companies": dict(user.companies),
    }


def company_view(company: Company) -> dict[str, Any]:
    return {
        "realm_id": company.realm_id,
        "name": company.name,
        "legal_name": company.legal_name,
        "country": company.country,
        "created_at": iso(company.created_at),
    }


def control_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/_emulator", tags=["emulator control"])

    def config_view() -> dict[str, Any]:
        config = store.config
        return {
            "access_token_ttl": config.access_token_ttl,
            "refresh_token_ttl": config.refresh_token_ttl,
            "code_ttl": config.code_ttl,
            "latency_ms": config.latency_ms,
            "clock_offset_s": store.clock_offset,
            "throttle_concurrent": config.throttle_concurrent,
            "throttle_per_second": config.throttle_per_second,
            "throttle_per_minute": config.throttle_per_minute,
            "throttle_batch_per_minute": config.throttle_batch_per_minute,
            "report_rows": config.report_rows,
        }

    @router.post("/reset")
    async def reset() -> dict[str, Any]:
        store.reset()
        return {"status": "reset", "users": len(store.users), "companies": len(store.companies)}

    @router.get("/users")
    async def list_users() -> list[dict[str, Any]]:
        return [user_view(u) for u in store.users.values()]

    @router.post("/users", status_code=201)
    async def create_user(body: NewUser) -> dict[str, Any]:
        if store.user_by_email(body.email) is not None or (body.sub and body.sub in store.users):
            raise HTTPException(409, "a user with this email or sub already exists")
        try:
            user = store.add_user(
                body.email, body.given_name, body.family_name, body.sub, dict(body.companies)
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return user_view(user)

    @router.post("/users/{sub}/roles")
    async def set_roles(sub: str, body: RolesUpdate) -> dict[str, Any]:
        try:
            return user_view(store.set_roles(sub, dict(body.companies)))
        except KeyError as exc:
            raise HTTPException(404, "unknown user") from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

    @router.get("/companies")
    async def list_companies() -> list[dict[str, Any]]:
        return [company_view(c) for c in store.companies.values()]

    @router.post("/companies", status_code=201)
    async def create_company(body: NewCompany) -> dict[str, Any]:
        try:
            company = store.add_company(body.name, body.realm_id, body.legal_name, body.country)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        return company_view(company)

    @router.post("/companies/{realm_id}/disconnect")
    async def disconnect(realm_id: str) -> dict[str, Any]:
        if realm_id not in store.companies:
            raise HTTPException(404, "unknown company")
        revoked = store.disconnect_realm(realm_id)
        store.stats.count_disconnect()
        return {"realm_id": realm_id, "revoked_grants": revoked}

    @router.get("/grants")
    async def grants() -> list[dict[str, Any]]:
        return store.grants_view()

    @router.get("/config")
    async def get_config() -> dict[str, Any]:
        return config_view()

    @router.post("/config")
    async def update_config(body: ConfigUpdate) -> dict[str, Any]:
        with store.lock:
            for name, value in body.model_dump(exclude_none=True).items():
                setattr(store.config, name, value)
        return config_view()

    @router.get("/webhooks")
    async def get_webhooks() -> dict[str, Any]:
        return store.webhooks.view()

    @router.post("/webhooks")
    async def update_webhooks(body: WebhookUpdate) -> dict[str, Any]:
        given = body.model_dump(exclude_unset=True)
        store.webhooks.configure(
            **{
                name: value
                for name, value in given.items()
                if value is not None or name in ("url", "verifier_token")
            }
        )
        return store.webhooks.view()

    @router.get("/webhooks/deliveries")
    async def webhook_deliveries() -> list[dict[str, Any]]:
        return list(store.webhooks.deliveries)

    @router.post("/clock")
    async def advance_clock(body: ClockAdvance) -> dict[str, Any]:
        with store.lock:
            store.clock_offset += body.advance_s
        return config_view()

    @router.get("/faults")
    async def list_faults() -> list[dict[str, Any]]:
        return store.faults.pending()

    @router.post("/faults", status_code=201)
    async def add_fault(body: FaultSpec) -> list[dict[str, Any]]:
        status = body.status
        if body.kind == "status" and status is None:
            status = 503
        store.faults.add(Fault(body.endpoint, body.kind, body.count, status, body.delay_s))
        return store.faults.pending()

    @router.delete("/faults", status_code=204)
    async def clear_faults() -> Response:
        store.faults.clear()
        return Response(status_code=204)

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**store.stats.snapshot(store.faults.fired), "accounting": store.traffic.snapshot()}

    @router.post("/sessions/signin")
    async def session_signin(body: SigninRequest, response: Response) -> dict[str, Any]:
        user = store.user_by_email(body.email)
        if user is None:
            raise HTTPException(404, "unknown user")
        sid = store.create_session(user.sub)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", path="/")
        return user_view(user)

    return router
