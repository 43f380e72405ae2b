"""Emulator settings, the Intuit vocabulary it understands (scopes, roles) and the demo seed.

Everything here is the emulator's own reading of Intuit's behaviour; nothing is shared with the
broker, so a misunderstanding on one side cannot silently hide the same mistake on the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

# Scopes Intuit's authorize endpoint accepts.
ACCOUNTING_SCOPE = "com.intuit.quickbooks.accounting"
PAYMENT_SCOPE = "com.intuit.quickbooks.payment"
KNOWN_SCOPES: tuple[str, ...] = (
    ACCOUNTING_SCOPE,
    PAYMENT_SCOPE,
    "openid",
    "profile",
    "email",
    "phone",
    "address",
)
# A company (realm) is only chosen, and `realmId` only returned, for these scopes.
COMPANY_SCOPES = frozenset({ACCOUNTING_SCOPE, PAYMENT_SCOPE})

# What each scope is shown as on the authorize page.
SCOPE_LABELS: dict[str, str] = {
    ACCOUNTING_SCOPE: "Your QuickBooks Online accounting data (customers, invoices, bills, "
    "payments, company info)",
    PAYMENT_SCOPE: "QuickBooks Payments: process and view payments",
    "openid": "Your Intuit user ID",
    "profile": "Your name",
    "email": "Your email address",
    "phone": "Your phone number",
    "address": "Your address",
}

# QuickBooks user roles in a company; only the first two may connect apps.
ROLES: tuple[str, ...] = ("master_admin", "company_admin", "standard")
ADMIN_ROLES = frozenset({"master_admin", "company_admin"})
ROLE_LABELS: dict[str, str] = {
    "master_admin": "Master admin",
    "company_admin": "Company admin",
    "standard": "Standard user",
}

# Intuit's refresh tokens also have a hard maximum life of five years since late 2025.
FIVE_YEARS = 5 * 365 * 24 * 3600


class EmulatorSettings(BaseModel):
    """How one emulator instance is configured (one Intuit app = one client)."""

    public_url: str = "http://127.0.0.1:9100"
    # Where the app reaches the server-to-server endpoints (token, revoke, userinfo, JWKS) when
    # that differs from what the browser sees, e.g. a compose network name. Like Intuit, whose
    # authorize page and token endpoint live on different hosts.
    internal_url: str | None = None
    client_id: str = "dev-client-id"
    client_secret: str = "dev-client-secret"  # noqa: S105 - a development default
    redirect_uris: list[str] = Field(default_factory=lambda: ["http://localhost:8000/callback"])
    state_file: str | Path | None = None
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 8726400
    code_ttl: int = 600
    latency_ms: int = 0
    seed: bool = True
    # Not in the brief's list, but every Intuit consent screen names the app.
    app_name: str = "cieTrade"
    refresh_token_hard_ttl: int = FIVE_YEARS
    # How long a browser flow (authorize request -> consent) stays usable.
    flow_ttl: int = 1800
    # Accounting API throttles per company and app, Intuit's limits (0 turns one off).
    throttle_concurrent: int = 10
    throttle_per_second: int = 10
    throttle_per_minute: int = 500
    throttle_batch_per_minute: int = 120
    # Data rows in a generated report (`GET …/reports/{name}`); raise it for multi-MB answers.
    report_rows: int = 200
    # Webhooks: where the app's endpoint is, its verifier token, the payload format (legacy,
    # cloudevents or both), the batching window and how often a notification is sent twice.
    webhook_url: str | None = None
    webhook_verifier_token: str | None = None
    webhook_format: Literal["legacy", "cloudevents", "both"] = "cloudevents"
    webhook_batch_window_s: float = 0.2
    webhook_duplicate_probability: float = 0.0

    @field_validator("public_url", "internal_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value is not None else None

    @property
    def api_url(self) -> str:
        return self.internal_url or self.public_url

    @property
    def issuer(self) -> str:
        # Intuit's issuer is `https://oauth.platform.intuit.com/op/v1`; the emulator mirrors the path.
        return f"{self.public_url}/op/v1"


# ---------------------------------------------------------------------------------------------
# The demo seed: the only place where demo companies and users are defined.
# ---------------------------------------------------------------------------------------------

SANDBOX_REALM = "9341452988354102"
GREENFIELD_REALM = "9341452988354203"

SEED_COMPANIES: list[dict[str, Any]] = [
    {
        "realm_id": SANDBOX_REALM,
        "name": "Sandbox Company_US_1",
        "legal_name": "Sandbox Company_US_1",
        "country": "US",
        "email": "noreply@quickbooks.com",
        "city": "Mountain View",
        "postal_code": "94043",
        "line1": "123 Sierra Way",
        "region": "CA",
    },
    {
        "realm_id": GREENFIELD_REALM,
        "name": "Greenfield Recycling LLC",
        "legal_name": "Greenfield Recycling Limited Liability Company",
        "country": "US",
        "email": "books@greenfield-recycling.example",
        "city": "Columbus",
        "postal_code": "43215",
        "line1": "88 Scrap Yard Road",
        "region": "OH",
    },
]

# `sub` values look like Intuit's (opaque, UUID-like) and never change between runs.
SEED_USERS: list[dict[str, Any]] = [
    {
        "sub": "7f3c2a9e-41d8-4b6a-9e2f-a1c5d3b8e701",
        "email": "alice@example.com",
        "given_name": "Alice",
        "family_name": "Admin",
        "companies": {SANDBOX_REALM: "master_admin", GREENFIELD_REALM: "company_admin"},
    },
    {
        "sub": "2b8e6d14-9c3f-4a71-8d5e-f04a6c2b9d12",
        "email": "bob@example.com",
        "given_name": "Bob",
        "family_name": "Builder",
        "companies": {SANDBOX_REALM: "company_admin"},
    },
    {
        "sub": "c94a1f7b-3e62-4d08-b5a9-6e2d8f1c4a23",
        "email": "carol@example.com",
        "given_name": "Carol",
        "family_name": "Clerk",
        "companies": {SANDBOX_REALM: "standard"},
    },
    {
        "sub": "5d0b8c3e-7a19-4f2d-a6e4-9b3c1d7e5f34",
        "email": "dave@example.com",
        "given_name": "Dave",
        "family_name": "Dual",
        "companies": {SANDBOX_REALM: "company_admin", GREENFIELD_REALM: "company_admin"},
    },
]
