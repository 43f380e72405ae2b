"""Settings for the broker, read from environment variables (README, "Configuration")."""

from __future__ import annotations

import base64
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

INTUIT_DISCOVERY_URLS = {
    "production": "https://developer.api.intuit.com/.well-known/openid_configuration",
    "sandbox": "https://developer.api.intuit.com/.well-known/openid_sandbox_configuration",
}
INTUIT_API_BASE_URLS = {
    "production": "https://quickbooks.api.intuit.com",
    "sandbox": "https://sandbox-quickbooks.api.intuit.com",
}

CommaList = Annotated[list[str], NoDecode]
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ConfigurationError(Exception):
    """A setting is missing or malformed; raised at startup with a message for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    data_dir: Path = Field(default=Path("./.broker-data"), alias="BROKER_DATA_DIR")

    intuit_client_id: str | None = Field(default=None, alias="INTUIT_CLIENT_ID")
    intuit_client_secret: str | None = Field(default=None, alias="INTUIT_CLIENT_SECRET", repr=False)
    intuit_environment: Literal["sandbox", "production"] = Field(
        default="sandbox", alias="INTUIT_ENVIRONMENT"
    )
    intuit_discovery_url_override: str | None = Field(default=None, alias="INTUIT_DISCOVERY_URL")
    intuit_api_base_url_override: str | None = Field(default=None, alias="INTUIT_API_BASE_URL")
    intuit_scopes: str = Field(
        default="com.intuit.quickbooks.accounting openid email profile", alias="INTUIT_SCOPES"
    )
    intuit_timeout_seconds: float = Field(default=15.0, alias="INTUIT_TIMEOUT_SECONDS", gt=0)
    intuit_max_attempts: int = Field(default=3, alias="INTUIT_MAX_ATTEMPTS", ge=1, le=10)
    intuit_backoff_seconds: float = Field(default=0.5, alias="INTUIT_BACKOFF_SECONDS", ge=0)
    intuit_backoff_max_seconds: float = Field(default=5.0, alias="INTUIT_BACKOFF_MAX_SECONDS", ge=0)

    public_url: str = Field(default="http://localhost:8000", alias="BROKER_PUBLIC_URL")
    return_url_allowlist: CommaList = Field(default_factory=list, alias="BROKER_RETURN_URL_ALLOWLIST")
    cors_origins_setting: CommaList | None = Field(default=None, alias="BROKER_CORS_ORIGINS")
    # How the callback knows it runs in the browser, for the user, that started Connect.
    connect_binding: Literal["ticket", "cookie"] = Field(default="ticket", alias="BROKER_CONNECT_BINDING")
    encryption_keys: str | None = Field(default=None, alias="BROKER_ENCRYPTION_KEYS", repr=False)

    jwt_secret: str | None = Field(default=None, alias="BROKER_JWT_SECRET", repr=False)
    jwt_public_key: str | None = Field(default=None, alias="BROKER_JWT_PUBLIC_KEY")
    jwt_jwks_url: str | None = Field(default=None, alias="BROKER_JWT_JWKS_URL")
    jwt_issuer: str | None = Field(default=None, alias="BROKER_JWT_ISSUER")
    jwt_audience: str | None = Field(default=None, alias="BROKER_JWT_AUDIENCE")
    # Longest lifetime (exp - iat, or exp - now without iat) of a user JWT; None: no cap.
    jwt_max_lifetime_seconds: int | None = Field(default=None, alias="BROKER_JWT_MAX_LIFETIME_SECONDS", ge=1)

    db_pool_size: int = Field(default=10, alias="BROKER_DB_POOL_SIZE", ge=1)
    # Token refreshes one process runs at once. None holds a pooled connection while Intuit
    # answers, so this is a bound on calls to Intuit, not on database connections.
    refresh_concurrency: int = Field(default=50, alias="BROKER_REFRESH_CONCURRENCY", ge=1)
    max_body_bytes: int = Field(default=64 * 1024, alias="BROKER_MAX_BODY_BYTES", ge=1024)
    max_connections_per_tenant: int = Field(default=20, alias="BROKER_MAX_CONNECTIONS_PER_TENANT", ge=1)
    # Serve /metrics on this port instead of the main one (which then answers 404 for it).
    metrics_port: int | None = Field(default=None, alias="BROKER_METRICS_PORT", ge=1, le=65535)
    # Unset: the interface `serve --host` binds (127.0.0.1 outside `serve`).
    metrics_host: str | None = Field(default=None, alias="BROKER_METRICS_HOST")
    log_level: str = Field(default="INFO", alias="BROKER_LOG_LEVEL")
    # Swagger UI at /docs and the document at /openapi.json. Unset: on, except with
    # INTUIT_ENVIRONMENT=production; see docs_enabled.
    docs_setting: bool | None = Field(default=None, alias="BROKER_DOCS")

    # Live event streams (service/streams), per process.
    streams_max: int = Field(default=1000, alias="BROKER_STREAMS_MAX", ge=1)
    streams_per_tenant: int = Field(default=50, alias="BROKER_STREAMS_PER_TENANT", ge=1)
    stream_heartbeat_seconds: float = Field(default=15.0, alias="BROKER_STREAM_HEARTBEAT_SECONDS", gt=0)
    stream_max_seconds: float = Field(default=3600.0, alias="BROKER_STREAM_MAX_SECONDS", gt=0)
    stream_queue_size: int = Field(default=100, alias="BROKER_STREAM_QUEUE_SIZE", ge=1)

    # Background work (token keep-alive, pending-link expiry, revocation retries).
    background_enabled: bool = Field(default=True, alias="BROKER_BACKGROUND_ENABLED")
    background_interval_seconds: float = Field(default=30.0, alias="BROKER_BACKGROUND_INTERVAL", gt=0)
    keepalive_refresh_age_seconds: int = Field(default=24 * 3600, alias="BROKER_KEEPALIVE_REFRESH_AGE", ge=60)
    keepalive_refresh_access_tokens: bool = Field(
        default=False, alias="BROKER_KEEPALIVE_REFRESH_ACCESS_TOKENS"
    )
    keepalive_concurrency: int = Field(default=8, alias="BROKER_KEEPALIVE_CONCURRENCY", ge=1)

    # Intuit's CorePlus calls: the app's monthly budget (the free tier's), and the cap of a
    # tenant without one of its own (unset: none). README, "Usage and the CorePlus budget".
    coreplus_monthly_budget: int = Field(
        default=500_000, alias="BROKER_COREPLUS_MONTHLY_BUDGET", ge=1, le=10**12
    )
    coreplus_tenant_monthly_cap: int | None = Field(
        default=None, alias="BROKER_COREPLUS_TENANT_MONTHLY_CAP", ge=0, le=10**12
    )

    # The QuickBooks gateway (service.gateway): forwarding, retries and Intuit's per-company limits.
    quickbooks_minor_version: int = Field(default=75, alias="BROKER_QUICKBOOKS_MINOR_VERSION", ge=1)
    quickbooks_max_body_bytes: int = Field(
        default=25 * 1024 * 1024, alias="BROKER_QUICKBOOKS_MAX_BODY_BYTES", ge=1024
    )
    # Request bodies up to this size are read before forwarding, and so can be sent again.
    quickbooks_retry_body_bytes: int = Field(
        default=1024 * 1024, alias="BROKER_QUICKBOOKS_RETRY_BODY_BYTES", ge=0
    )
    quickbooks_deadline_seconds: float = Field(default=30.0, alias="BROKER_QUICKBOOKS_DEADLINE_SECONDS", gt=0)
    quickbooks_queue_seconds: float = Field(default=5.0, alias="BROKER_QUICKBOOKS_QUEUE_SECONDS", ge=0)
    quickbooks_max_in_flight: int = Field(default=10, alias="BROKER_QUICKBOOKS_MAX_IN_FLIGHT", ge=0)
    quickbooks_per_second: int = Field(default=10, alias="BROKER_QUICKBOOKS_PER_SECOND", ge=0)
    quickbooks_per_minute: int = Field(default=500, alias="BROKER_QUICKBOOKS_PER_MINUTE", ge=0)
    quickbooks_batch_per_minute: int = Field(default=120, alias="BROKER_QUICKBOOKS_BATCH_PER_MINUTE", ge=0)
    # Added to each window (1 s, 60 s): a call admitted at the edge of one can reach Intuit a few
    # milliseconds later than another, and Intuit counts arrivals.
    quickbooks_window_margin_seconds: float = Field(
        default=0.1, alias="BROKER_QUICKBOOKS_WINDOW_MARGIN_SECONDS", ge=0, le=5
    )
    # Least time between two calls to one company; unset: 60 s / the per-minute limit (0.12 s),
    # the pace that uses a whole minute. Spread out, ten calls take 1.2 s, so each second's
    # window at Intuit keeps 0.2 s of slack for calls that arrive later than others.
    quickbooks_min_interval_seconds: float | None = Field(
        default=None, alias="BROKER_QUICKBOOKS_MIN_INTERVAL_SECONDS", ge=0, le=60
    )
    # An in-flight slot lapses after this long unless renewed (a replica killed mid-call).
    quickbooks_lease_seconds: float = Field(default=60.0, alias="BROKER_QUICKBOOKS_LEASE_SECONDS", ge=5)
    # While the in-flight limit is the company's only one (the windows and the pace off), a
    # finished call's slot goes to this replica's next call of the company without a statement,
    # for this long after PostgreSQL last admitted a call on it: how late this replica may see a
    # pause another replica set. 0: every call asks PostgreSQL. Batches keep their statement
    # while their own limit is on. At most 1 s: a reused lease can then neither have lapsed
    # (leases last at least 5 s) nor have been renewed (first after a third of one).
    quickbooks_slot_reuse_seconds: float = Field(
        default=0.05, alias="BROKER_QUICKBOOKS_SLOT_REUSE_SECONDS", ge=0, le=1
    )

    # Outgoing webhooks (service.events). Private destinations (and plain http) only in development.
    webhook_allow_private: bool = Field(default=False, alias="BROKER_WEBHOOK_ALLOW_PRIVATE")
    webhook_delivery_enabled: bool = Field(default=True, alias="BROKER_WEBHOOK_DELIVERY_ENABLED")
    webhook_timeout_seconds: float = Field(default=10.0, alias="BROKER_WEBHOOK_TIMEOUT", gt=0, le=30)
    webhook_concurrency_per_endpoint: int = Field(
        default=10, alias="BROKER_WEBHOOK_CONCURRENCY_PER_ENDPOINT", ge=1, le=100
    )
    webhook_max_in_flight: int = Field(default=100, alias="BROKER_WEBHOOK_MAX_IN_FLIGHT", ge=1)
    webhook_max_endpoints_per_tenant: int = Field(
        default=10, alias="BROKER_WEBHOOK_MAX_ENDPOINTS_PER_TENANT", ge=1
    )

    # Intuit's webhook verifier tokens (comma-separated: during a rotation, the new and the old);
    # none: POST /intuit/webhooks refuses everything.
    intuit_webhook_verifier_tokens: CommaList = Field(
        default_factory=list, alias="INTUIT_WEBHOOK_VERIFIER_TOKENS", repr=False
    )

    _split = field_validator(
        "return_url_allowlist", "cors_origins_setting", "intuit_webhook_verifier_tokens", mode="before"
    )(_split_commas)

    @field_validator("docs_setting", "coreplus_tenant_monthly_cap", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def quickbooks_interval_seconds(self) -> float:
        if self.quickbooks_min_interval_seconds is not None:
            return self.quickbooks_min_interval_seconds
        return 60.0 / self.quickbooks_per_minute if self.quickbooks_per_minute else 0.0

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/callback"

    @property
    def cors_origins(self) -> list[str]:
        if self.cors_origins_setting is not None:
            return self.cors_origins_setting
        return self.return_url_allowlist

    @property
    def docs_enabled(self) -> bool:
        """BROKER_DOCS when set; otherwise docs are served everywhere but on production."""
        if self.docs_setting is not None:
            return self.docs_setting
        return self.intuit_environment != "production"

    @property
    def intuit_discovery_url(self) -> str:
        return self.intuit_discovery_url_override or INTUIT_DISCOVERY_URLS[self.intuit_environment]

    @property
    def intuit_api_base_url(self) -> str:
        base = self.intuit_api_base_url_override or INTUIT_API_BASE_URLS[self.intuit_environment]
        return base.rstrip("/")

    @cached_property
    def parsed_encryption_keys(self) -> list[tuple[str, bytes]]:
        """`kid:base64key` pairs, first one encrypting. Raises ConfigurationError when malformed."""
        if not self.encryption_keys:
            raise ConfigurationError(
                "BROKER_ENCRYPTION_KEYS is required: comma-separated kid:base64key entries "
                "with 32-byte keys (generate one with: qbo-broker generate-key)"
            )
        keys: list[tuple[str, bytes]] = []
        for entry in self.encryption_keys.split(","):
            kid, sep, encoded = entry.strip().partition(":")
            if not sep or not kid:
                raise ConfigurationError("BROKER_ENCRYPTION_KEYS entries must look like kid:base64key")
            if not _KEY_ID.match(kid):
                # Ciphertexts read "kid.payload": a dot or colon in a key id would be ambiguous.
                raise ConfigurationError(
                    f"BROKER_ENCRYPTION_KEYS key id {kid!r} must be 1-32 letters, digits, _ or -"
                )
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ConfigurationError(f"BROKER_ENCRYPTION_KEYS key {kid!r} is not valid base64") from None
            if len(key) != 32:
                raise ConfigurationError(
                    f"BROKER_ENCRYPTION_KEYS key {kid!r} must be 32 bytes, got {len(key)}"
                )
            if any(existing == kid for existing, _ in keys):
                raise ConfigurationError(f"BROKER_ENCRYPTION_KEYS repeats key id {kid!r}")
            keys.append((kid, key))
        return keys

    def check_for_working(self) -> None:
        """Refuse to start the background worker without the Intuit app's keys and the
        encryption keys, instead of failing later."""
        problems = self._worker_problems()
        if problems:
            raise ConfigurationError("; ".join(problems))

    def _worker_problems(self) -> list[str]:
        problems = []
        if not self.intuit_client_id or not self.intuit_client_secret:
            problems.append("INTUIT_CLIENT_ID and INTUIT_CLIENT_SECRET are required")
        try:
            _ = self.parsed_encryption_keys
        except ConfigurationError as exc:
            problems.append(str(exc))
        return problems

    def check_for_serving(self) -> None:
        """Refuse to start without what every request will need, instead of failing later."""
        problems = self._worker_problems()
        if not (self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url):
            problems.append(
                "one of BROKER_JWT_SECRET, BROKER_JWT_PUBLIC_KEY or BROKER_JWT_JWKS_URL is required"
            )
        if self.jwt_secret is not None and len(self.jwt_secret) < 32:
            problems.append("BROKER_JWT_SECRET must be at least 32 characters")
        if (self.jwt_public_key or self.jwt_jwks_url) and not (self.jwt_issuer and self.jwt_audience):
            # An RS256 key (above all a JWKS) often signs tokens for other audiences too: without
            # both checks, a token issued for another application would be accepted here.
            problems.append(
                "BROKER_JWT_ISSUER and BROKER_JWT_AUDIENCE are required with "
                "BROKER_JWT_PUBLIC_KEY or BROKER_JWT_JWKS_URL"
            )
        if self.intuit_environment == "production":
            # Intuit accepts only https redirect URIs (and no localhost) for production apps.
            if not self.public_url.startswith("https://"):
                problems.append("BROKER_PUBLIC_URL must be https:// when INTUIT_ENVIRONMENT=production")
            # Client secrets and tokens travel to these: never in clear text (sandbox may use the
            # emulator over http).
            for name, url in (
                ("INTUIT_DISCOVERY_URL", self.intuit_discovery_url_override),
                ("INTUIT_API_BASE_URL", self.intuit_api_base_url_override),
            ):
                if url is not None and not url.lower().startswith("https://"):
                    problems.append(f"{name} must be https:// when INTUIT_ENVIRONMENT=production")
        if problems:
            raise ConfigurationError("; ".join(problems))
