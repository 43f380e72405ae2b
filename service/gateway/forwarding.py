"""What the gateway sends on and gives back: the path under the company, the query string,
the headers both ways, and the `requestid` of a write. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import re
import uuid
from urllib.parse import parse_qsl, unquote_to_bytes

from service.core.errors import ProblemError, ValidationFailed

# Hop-by-hop headers (RFC 9110 7.6.1) and what only concerns the hop to the broker: its own
# credentials, cookies and idempotency key, and where the request came from.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | frozenset(
    {
        b"host",
        b"authorization",
        b"x-api-key",
        b"cookie",
        b"idempotency-key",
        b"content-length",
        b"expect",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"accept-encoding",
    }
)
# The broker's server sets its own; Intuit's cookies are for Intuit.
_NOT_RETURNED = _HOP_BY_HOP | frozenset(
    {b"date", b"server", b"set-cookie", b"www-authenticate", b"x-request-id"}
)
# RFC 3986 pchar plus "/": anything else (spaces, quotes, backslashes, controls) must come
# percent-encoded.
_PATH_BYTES = re.compile(rb"^[A-Za-z0-9\-._~!$&'()*+,;=:@%/]+$")
_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
REALM_ID = re.compile(r"^\d{1,32}$")
IDEMPOTENCY_KEY_MAX = 255


class InvalidQuickBooksPath(ProblemError):
    status, code, title = 400, "invalid_quickbooks_path", "The QuickBooks path is not valid"


def company_path(raw: bytes) -> str:
    """The path under `/v3/company/{realm}/` as the caller encoded it, refused unless it stays
    there: no empty, `.` or `..` segment, no encoded `/` or `\\` in one, no scheme tricks."""
    if not raw or not _PATH_BYTES.match(raw) or _PERCENT.search(raw):
        raise InvalidQuickBooksPath(
            "The path must be a relative QuickBooks API path, e.g. "
            "`customer/1` or `query`, with reserved characters encoded."
        )
    for segment in raw.split(b"/"):
        decoded = unquote_to_bytes(segment)
        if (
            decoded in (b"", b".", b"..")
            or any(c in decoded for c in b"/\\?#")
            or any(c < 0x20 or c == 0x7F for c in decoded)
        ):
            raise InvalidQuickBooksPath(
                "The path must stay under the company: no empty, `.` "
                "or `..` segments and no encoded `/` or `\\`."
            )
    return raw.decode("ascii")


def _names(query: bytes) -> set[str]:
    return {name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}


def query_value(query: bytes, name: str) -> str | None:
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            return value
    return None


def with_params(query: bytes, **params: str | None) -> bytes:
    """The caller's query string byte for byte, with each param appended that it lacks."""
    present = _names(query)
    extra = [
        f"{name}={value}".encode()
        for name, value in params.items()
        if value is not None and name not in present
    ]
    return b"&".join([query, *extra] if query else extra)


def request_id_for(
    *, connection_id: uuid.UUID, query: bytes, idempotency_key: str | None
) -> tuple[str, bool]:
    """A write's `requestid`: the caller's own, else one derived from its Idempotency-Key
    (the same key on the same connection gives the same id; on another connection, another
    one), else a new one. Second: whether it must be added to the query string."""
    own = query_value(query, "requestid")
    if own:
        return own, False
    if idempotency_key is not None:
        if not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
            raise ValidationFailed(
                f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.",
                errors=[
                    {"loc": ["header", "Idempotency-Key"], "msg": "invalid length", "type": "value_error"}
                ],
            )
        digest = hashlib.sha256(f"{connection_id}\n{idempotency_key}".encode()).hexdigest()
        return digest[:32], True  # 128 bits; Intuit takes at most 50 characters
    return uuid.uuid4().hex, True


# Sent when the caller names no client of its own.
USER_AGENT = b"qbo-broker"


def request_headers(raw: list[tuple[bytes, bytes]], access_token: str) -> list[tuple[bytes, bytes]]:
    """The caller's end-to-end headers, with the broker's Authorization and JSON by default."""
    named_by_connection = {
        name.strip().lower()
        for value in (v for k, v in raw if k.lower() == b"connection")
        for name in value.split(b",")
    }
    headers: list[tuple[bytes, bytes]] = []
    accept = encoding = agent = False
    for name, value in raw:
        lowered = name.lower()
        agent = agent or lowered == b"user-agent"
        if lowered == b"accept-encoding":
            encoding = True
            headers.append((b"accept-encoding", value))
            continue
        if lowered in _NOT_FORWARDED or lowered in named_by_connection:
            continue
        if lowered == b"accept":
            if value.strip() == b"*/*":  # anything will do (HTTP clients' default): JSON then
                continue
            accept = True
        headers.append((lowered, value))
    if not accept:
        headers.append((b"accept", b"application/json"))
    if not encoding:
        # The answer is relayed as received: ask for what the caller can read.
        headers.append((b"accept-encoding", b"identity"))
    if not agent:
        headers.append((b"user-agent", USER_AGENT))
    headers.append((b"authorization", b"Bearer " + access_token.encode()))
    return headers


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Intuit's headers as they came (Content-Type, Content-Length, intuit_tid, …), without
    hop-by-hop ones and those the broker sets itself."""
    named_by_connection = {
        name.strip().lower()
        for value in (v for k, v in raw if k.lower() == b"connection")
        for name in value.split(b",")
    }
    return [
        (name.lower(), value)
        for name, value in raw
        if name.lower() not in _NOT_RETURNED and name.lower() not in named_by_connection
    ]
