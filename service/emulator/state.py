"""The emulator's world: users, companies, browser flows, sessions, codes, grants and tokens.

One `Store` per app. Every read-modify-write happens in a synchronous section under one lock
that is never held across an `await`, so each OAuth operation is atomic even with hundreds of
concurrent requests, and the app stays correct if a test drives it from another thread.
With a state file, the durable part of the world is rewritten after every change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .books import Books, Ledger
from .config import ADMIN_ROLES, COMPANY_SCOPES, SEED_COMPANIES, SEED_USERS, EmulatorSettings
from .faults import Faults, Stats
from .keys import SigningKey
from .traffic import Limits, RequestIds, Traffic
from .webhooks import WebhookConfig, WebhookSender

STATE_VERSION = 1
_RETIRED_MAX = 10_000  # remembered dead refresh tokens (hashed), only to explain invalid_grant


class OAuthError(Exception):
    """An RFC 6749 error answer: `{"error": ..., "error_description": ...}`."""

    def __init__(self, error: str, description: str | None = None, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class User:
    sub: str
    email: str
    given_name: str
    family_name: str
    companies: dict[str, str] = field(default_factory=dict)  # realm_id -> role
    email_verified: bool = True

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}".strip()

    def is_admin_of(self, realm_id: str) -> bool:
        return self.companies.get(realm_id) in ADMIN_ROLES


@dataclass
class Company:
    realm_id: str
    name: str
    legal_name: str
    country: str = "US"
    email: str = ""
    line1: str = ""
    city: str = ""
    region: str = ""
    postal_code: str = ""
    created_at: float = 0.0


@dataclass
class Flow:
    """One authorize request while the browser walks through sign-in and consent."""

    flow_id: str
    client_id: str
    redirect_uri: str
    scopes: list[str]
    state: str
    expires_at: float
    realm_id: str | None = None
    finished: bool = False
    # Sent by clients that use them; Intuit documents neither, and honours them if sent.
    nonce: str | None = None
    code_challenge: str | None = None

    @property
    def needs_company(self) -> bool:
        return bool(COMPANY_SCOPES.intersection(self.scopes))


@dataclass
class Session:
    sub: str
    created_at: float


@dataclass
class AuthCode:
    client_id: str
    redirect_uri: str
    sub: str
    realm_id: str | None
    scopes: list[str]
    expires_at: float
    auth_time: float
    used: bool = False
    grant_id: str | None = None
    nonce: str | None = None
    code_challenge: str | None = None  # S256 of the verifier the exchange must present


@dataclass
class Grant:
    """The app's connection to one company (or, without a company scope, to one user)."""

    grant_id: str
    client_id: str
    realm_id: str | None
    sub: str
    scopes: list[str]
    created_at: float
    auth_time: float
    hard_expires_at: float
    refresh_token: str | None
    refresh_expires_at: float
    refresh_count: int = 0
    last_refreshed_at: float | None = None


@dataclass
class AccessToken:
    grant_id: str
    expires_at: float


@dataclass
class Issued:
    """What a successful token request hands out."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    hard_expires_in: int
    grant: Grant
    first_issue: bool  # True for the code exchange: the only answer that carries an id_token
    nonce: str | None = None  # the authorize request's, echoed in the id_token


@dataclass
class RuntimeConfig:
    """The part of the settings tests may change at run time via `/_emulator/config`."""

    access_token_ttl: int
    refresh_token_ttl: int
    code_ttl: int
    latency_ms: int
    throttle_concurrent: int = 10
    throttle_per_second: int = 10
    throttle_per_minute: int = 500
    throttle_batch_per_minute: int = 120
    report_rows: int = 200

    @classmethod
    def from_settings(cls, settings: EmulatorSettings) -> RuntimeConfig:
        return cls(
            settings.access_token_ttl,
            settings.refresh_token_ttl,
            settings.code_ttl,
            settings.latency_ms,
            settings.throttle_concurrent,
            settings.throttle_per_second,
            settings.throttle_per_minute,
            settings.throttle_batch_per_minute,
            settings.report_rows,
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            self.throttle_concurrent,
            self.throttle_per_second,
            self.throttle_per_minute,
            self.throttle_batch_per_minute,
        )


def _access_token() -> str:
    # Intuit's access tokens are JWE compact strings; the emulator's are opaque but look alike.
    header = "eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0"
    return ".".join(
        [header, "", secrets.token_urlsafe(16), secrets.token_urlsafe(96), secrets.token_urlsafe(16)]
    )


def _refresh_token() -> str:
    return "AB11" + secrets.token_urlsafe(36)


def iso(timestamp: float | None) -> str | None:
    """RFC 3339 (UTC) for control-API answers."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _pkce_ok(verifier: str | None, challenge: str) -> bool:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)) without padding."""
    if not verifier or not 43 <= len(verifier) <= 128:
        return False
    computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return secrets.compare_digest(computed, challenge.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """All mutable emulator state plus its persistence."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self.config = RuntimeConfig.from_settings(settings)
        self.stats = Stats()
        self.faults = Faults()
        self.clock_offset = 0.0
        # The Accounting API: each company's books, its front door and remembered requestids.
        self.books = Books(seed=settings.seed)
        self.traffic = Traffic()
        self.request_ids = RequestIds(self.now)
        self.signing_key = SigningKey.generate()
        # Intuit's webhooks: every recorded change of the books goes to the app's endpoint.
        self.webhooks = WebhookSender(
            WebhookConfig(
                url=settings.webhook_url,
                verifier_token=settings.webhook_verifier_token,
                format=settings.webhook_format,
                batch_window_s=settings.webhook_batch_window_s,
                duplicate_probability=settings.webhook_duplicate_probability,
            ),
            settings.client_id,
        )
        self.books.listeners.append(self.webhooks.on_change)
        self._clear()
        path = self._path
        if path is not None and path.exists():
            self._load(path)
        else:
            self._seed()
            self._changed()

    # -- time, persistence, seed ----------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self.clock_offset

    @property
    def _path(self) -> Path | None:
        return Path(self.settings.state_file) if self.settings.state_file else None

    def _clear(self) -> None:
        self.users: dict[str, User] = {}
        self.companies: dict[str, Company] = {}
        self.flows: dict[str, Flow] = {}
        self.sessions: dict[str, Session] = {}
        self.codes: dict[str, AuthCode] = {}
        self.grants: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_index: dict[str, str] = {}  # live refresh token -> grant_id
        # sha256(dead refresh token) -> (why it died, its realm): explains invalid_grant and
        # lets stats attribute a refresh with a stale token to its company.
        self.retired: dict[str, tuple[str, str | None]] = {}
        self.books.clear()

    def _seed(self) -> None:
        if not self.settings.seed:
            return
        now = self.now()
        for raw in SEED_COMPANIES:
            company = Company(**raw, created_at=now)
            self.companies[company.realm_id] = company
        for raw in SEED_USERS:
            user = User(**{**raw, "companies": dict(raw["companies"])})
            self.users[user.sub] = user

    def reset(self) -> None:
        with self.lock:
            self._clear()
            self.config = RuntimeConfig.from_settings(self.settings)
            self.clock_offset = 0.0
            self.stats.reset()
            self.faults.reset()
            self.traffic.reset()
            self.request_ids.reset()
            self.webhooks.reset()
            self._seed()
            self._changed()

    def _changed(self) -> None:
        path = self._path
        if path is None:
            return
        document = {
            "version": STATE_VERSION,
            "signing_key_pem": self.signing_key.to_pem(),
            "users": [asdict(u) for u in self.users.values()],
            "companies": [asdict(c) for c in self.companies.values()],
            "sessions": {sid: asdict(s) for sid, s in self.sessions.items()},
            "codes": {code: asdict(c) for code, c in self.codes.items()},
            "grants": [asdict(g) for g in self.grants.values()],
            "access_tokens": {tok: asdict(a) for tok, a in self.access_tokens.items()},
            "books": self.books.dump(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a crash mid-write never leaves a truncated state file.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the emulator state file {path}: {exc}") from exc
        if document.get("version") != STATE_VERSION:
            raise RuntimeError(f"unsupported emulator state file version in {path}")
        if document.get("signing_key_pem"):
            self.signing_key = SigningKey.from_pem(document["signing_key_pem"])
        self.users = {u["sub"]: User(**u) for u in document.get("users", [])}
        self.companies = {c["realm_id"]: Company(**c) for c in document.get("companies", [])}
        self.sessions = {k: Session(**v) for k, v in document.get("sessions", {}).items()}
        self.codes = {k: AuthCode(**v) for k, v in document.get("codes", {}).items()}
        self.grants = {g["grant_id"]: Grant(**g) for g in document.get("grants", [])}
        self.access_tokens = {k: AccessToken(**v) for k, v in document.get("access_tokens", {}).items()}
        self.refresh_index = {g.refresh_token: g.grant_id for g in self.grants.values() if g.refresh_token}
        self.books.load(document.get("books"))

    # -- users and companies --------------------------------------------------------------------

    def user_by_email(self, email: str) -> User | None:
        wanted = email.strip().lower()
        return next((u for u in self.users.values() if u.email.lower() == wanted), None)

    def add_user(
        self, email: str, given_name: str, family_name: str, sub: str | None, companies: dict[str, str]
    ) -> User:
        with self.lock:
            if self.user_by_email(email) is not None:
                raise ValueError(f"a user with email {email} already exists")
            sub = sub or str(uuid.uuid4())
            if sub in self.users:
                raise ValueError(f"a user with sub {sub} already exists")
            self._check_realms(companies)
            user = User(sub, email.strip(), given_name, family_name, dict(companies))
            self.users[sub] = user
            self._changed()
            return user

    def set_roles(self, sub: str, roles: dict[str, str | None]) -> User:
        with self.lock:
            user = self.users.get(sub)
            if user is None:
                raise KeyError(sub)
            self._check_realms(roles)
            for realm_id, role in roles.items():
                if role is None:
                    user.companies.pop(realm_id, None)
                else:
                    user.companies[realm_id] = role
            self._changed()
            return user

    def _check_realms(self, realms: dict[str, Any]) -> None:
        unknown = [realm for realm in realms if realm not in self.companies]
        if unknown:
            raise ValueError(f"unknown realm ids: {', '.join(unknown)}")

    def add_company(self, name: str, realm_id: str | None, legal_name: str | None, country: str) -> Company:
        with self.lock:
            if realm_id is None:
                while realm_id is None or realm_id in self.companies:
                    realm_id = "9341" + "".join(str(secrets.randbelow(10)) for _ in range(12))
            elif realm_id in self.companies:
                raise ValueError(f"a company with realm id {realm_id} already exists")
            company = Company(realm_id, name, legal_name or name, country, created_at=self.now())
            self.companies[realm_id] = company
            self._changed()
            return company

    def ledger(self, realm_id: str) -> Ledger:
        """A company's books (the caller holds the lock), seeded on first use."""
        return self.books.ledger(realm_id, self.companies[realm_id].created_at)

    def books_changed(self) -> None:
        """Persist after an Accounting API write (the caller holds the lock)."""
        self._changed()

    def companies_of(self, user: User) -> list[Company]:
        return [self.companies[r] for r in user.companies if r in self.companies]

    def admins_of(self, realm_id: str) -> list[User]:
        return [u for u in self.users.values() if u.is_admin_of(realm_id)]

    # -- browser sessions and flows -------------------------------------------------------------

    def create_session(self, sub: str) -> str:
        with self.lock:
            sid = secrets.token_urlsafe(32)
            self.sessions[sid] = Session(sub, self.now())
            self._changed()
            return sid

    def session(self, sid: str | None) -> tuple[Session, User] | None:
        found = self.sessions.get(sid) if sid else None
        user = self.users.get(found.sub) if found else None
        return (found, user) if found and user else None

    def end_session(self, sid: str | None) -> None:
        with self.lock:
            if sid and self.sessions.pop(sid, None) is not None:
                self._changed()

    def create_flow(
        self,
        client_id: str,
        redirect_uri: str,
        scopes: list[str],
        state: str,
        *,
        nonce: str | None = None,
        code_challenge: str | None = None,
    ) -> Flow:
        with self.lock:
            now = self.now()
            # Abandoned flows are the normal case (a non-admin may never come back): prune them.
            for flow_id in [f for f, flow in self.flows.items() if flow.expires_at < now]:
                del self.flows[flow_id]
            flow = Flow(
                secrets.token_urlsafe(18),
                client_id,
                redirect_uri,
                scopes,
                state,
                now + self.settings.flow_ttl,
                nonce=nonce,
                code_challenge=code_challenge,
            )
            self.flows[flow.flow_id] = flow
            return flow

    def flow(self, flow_id: str) -> Flow | None:
        flow = self.flows.get(flow_id)
        return flow if flow is not None and flow.expires_at >= self.now() else None

    def live_grant(self, client_id: str, realm_id: str | None, sub: str) -> Grant | None:
        """The grant an authorization for (client, realm) would replace."""
        for grant in self.grants.values():
            if grant.client_id != client_id or grant.realm_id != realm_id:
                continue
            # Without a company there is one grant per user, not per company.
            if realm_id is not None or grant.sub == sub:
                return grant
        return None

    def issue_code(self, flow: Flow, user: User, auth_time: float) -> str:
        with self.lock:
            now = self.now()
            for stale in [c for c, ac in self.codes.items() if ac.expires_at + 3600 < now]:
                del self.codes[stale]
            code = "AB11" + secrets.token_urlsafe(24)
            self.codes[code] = AuthCode(
                flow.client_id,
                flow.redirect_uri,
                user.sub,
                flow.realm_id if flow.needs_company else None,
                list(flow.scopes),
                now + self.config.code_ttl,
                auth_time,
                nonce=flow.nonce,
                code_challenge=flow.code_challenge,
            )
            flow.finished = True
            self._changed()
            return code

    # -- token operations (all atomic under the lock) -------------------------------------------

    def exchange_code(
        self, client_id: str, code: str, redirect_uri: str, code_verifier: str | None = None
    ) -> Issued:
        with self.lock:
            now = self.now()
            entry = self.codes.get(code)
            if entry is None or entry.client_id != client_id:
                raise OAuthError("invalid_grant", "Invalid authorization code")
            if entry.used:
                # RFC 6749 4.1.2: a replayed code revokes what it was first exchanged for.
                if entry.grant_id is not None and entry.grant_id in self.grants:
                    self._kill_grant(entry.grant_id, "its authorization code was replayed")
                self._changed()
                raise OAuthError("invalid_grant", "Authorization code has already been used")
            # A presented code is burnt even if the exchange fails below: strictly single use.
            entry.used = True
            if entry.expires_at < now:
                self._changed()
                raise OAuthError("invalid_grant", "Authorization code has expired")
            if entry.redirect_uri != redirect_uri:
                self._changed()
                raise OAuthError("invalid_grant", "redirect_uri does not match the authorize request")
            if entry.code_challenge is not None and not _pkce_ok(code_verifier, entry.code_challenge):
                self._changed()
                raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
            # One live grant per app and company: a new authorization replaces the old one.
            previous = self.live_grant(client_id, entry.realm_id, entry.sub)
            if previous is not None:
                reason = (
                    "the connection was taken over by another user (Switch Admin)"
                    if previous.sub != entry.sub
                    else "the user connected the app again"
                )
                self._kill_grant(previous.grant_id, reason)
            hard = now + self.settings.refresh_token_hard_ttl
            grant = Grant(
                uuid.uuid4().hex,
                client_id,
                entry.realm_id,
                entry.sub,
                list(entry.scopes),
                now,
                entry.auth_time,
                hard,
                None,
                now,
            )
            self.grants[grant.grant_id] = grant
            entry.grant_id = grant.grant_id
            issued = self._issue(grant, now, first_issue=True)
            issued.nonce = entry.nonce
            self._changed()
            return issued

    def refresh(self, client_id: str, refresh_token: str) -> Issued:
        with self.lock:
            now = self.now()
            grant_id = self.refresh_index.get(refresh_token)
            grant = self.grants.get(grant_id) if grant_id else None
            if grant is None:
                dead = self.retired.get(_digest(refresh_token))
                raise OAuthError("invalid_grant", f"Token invalid: {dead[0]}" if dead else "Token invalid")
            if grant.client_id != client_id:
                raise OAuthError("invalid_grant", "Incorrect Token type or clientID")
            if grant.refresh_expires_at <= now or grant.hard_expires_at <= now:
                self._kill_grant(grant.grant_id, "it expired")
                self._changed()
                raise OAuthError("invalid_grant", "Token expired")
            # Strict rotation: every refresh issues a new refresh token and the old one dies now.
            grant.refresh_count += 1
            grant.last_refreshed_at = now
            issued = self._issue(grant, now, first_issue=False)
            self._changed()
            return issued

    def _issue(self, grant: Grant, now: float, *, first_issue: bool) -> Issued:
        for stale in [t for t, a in self.access_tokens.items() if a.expires_at <= now]:
            del self.access_tokens[stale]
        if grant.refresh_token is not None:
            self._retire(grant, "it was rotated by a later refresh")
        access = _access_token()
        self.access_tokens[access] = AccessToken(grant.grant_id, now + self.config.access_token_ttl)
        refresh = _refresh_token()
        grant.refresh_token = refresh
        grant.refresh_expires_at = min(now + self.config.refresh_token_ttl, grant.hard_expires_at)
        self.refresh_index[refresh] = grant.grant_id
        return Issued(
            access,
            refresh,
            self.config.access_token_ttl,
            int(grant.refresh_expires_at - now),
            int(grant.hard_expires_at - now),
            Grant(**asdict(grant)),
            first_issue,
        )

    def _retire(self, grant: Grant, reason: str) -> None:
        if grant.refresh_token is None:
            return
        self.refresh_index.pop(grant.refresh_token, None)
        self.retired[_digest(grant.refresh_token)] = (reason, grant.realm_id)
        while len(self.retired) > _RETIRED_MAX:
            del self.retired[next(iter(self.retired))]

    def _kill_grant(self, grant_id: str, reason: str) -> None:
        grant = self.grants.pop(grant_id, None)
        if grant is None:
            return
        self._retire(grant, f"the grant was revoked: {reason}")
        for token in [t for t, a in self.access_tokens.items() if a.grant_id == grant_id]:
            del self.access_tokens[token]

    def realm_of_refresh_token(self, refresh_token: str | None) -> str | None:
        """The company a live or recently dead refresh token belongs(ed) to, for the stats."""
        if not refresh_token:
            return None
        grant_id = self.refresh_index.get(refresh_token)
        grant = self.grants.get(grant_id) if grant_id else None
        if grant is not None:
            return grant.realm_id
        dead = self.retired.get(_digest(refresh_token))
        return dead[1] if dead else None

    def revoke(self, client_id: str, token: str) -> bool:
        """Revoke the whole grant behind a refresh or access token; unknown tokens are a no-op."""
        with self.lock:
            grant_id = self.refresh_index.get(token)
            if grant_id is None and token in self.access_tokens:
                grant_id = self.access_tokens[token].grant_id
            grant = self.grants.get(grant_id) if grant_id else None
            if grant is None or grant.client_id != client_id:
                return False
            self._kill_grant(grant.grant_id, "the app revoked it")
            self._changed()
            return True

    def disconnect_realm(self, realm_id: str) -> int:
        """The user disconnects the app inside QuickBooks: every grant on the company dies."""
        with self.lock:
            doomed = [g.grant_id for g in self.grants.values() if g.realm_id == realm_id]
            for grant_id in doomed:
                self._kill_grant(grant_id, "the app was disconnected inside QuickBooks")
            self._changed()
            return len(doomed)

    def check_access(self, token: str | None) -> tuple[Grant, User] | str:
        """The grant and user behind a live access token, or why it is not accepted."""
        entry = self.access_tokens.get(token) if token else None
        if entry is None:
            return "Token invalid or revoked"
        if entry.expires_at <= self.now():
            return "Token expired"
        grant = self.grants.get(entry.grant_id)
        user = self.users.get(grant.sub) if grant else None
        if grant is None or user is None:
            return "Token revoked"
        return grant, user

    def grants_view(self) -> list[dict[str, Any]]:
        with self.lock:
            now = self.now()
            rows = []
            for grant in self.grants.values():
                owner = self.users.get(grant.sub)
                live_refresh = (
                    grant.refresh_token is not None
                    and grant.refresh_expires_at > now
                    and grant.hard_expires_at > now
                )
                rows.append(
                    {
                        "grant_id": grant.grant_id,
                        "client_id": grant.client_id,
                        "realm_id": grant.realm_id,
                        "sub": grant.sub,
                        "owner_sub": grant.sub,
                        "owner_email": owner.email if owner else None,
                        "scopes": grant.scopes,
                        "live_refresh_tokens": 1 if live_refresh else 0,
                        "live_access_tokens": sum(
                            1
                            for a in self.access_tokens.values()
                            if a.grant_id == grant.grant_id and a.expires_at > now
                        ),
                        "created_at": iso(grant.created_at),
                        "refresh_count": grant.refresh_count,
                        "last_refreshed_at": iso(grant.last_refreshed_at),
                        "refresh_token_expires_at": iso(grant.refresh_expires_at),
                    }
                )
            return rows
