"""JSON logs with a request id on every line, secrets redacted; request ids and HTTP metrics."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.metrics import HTTP_LATENCY, HTTP_REQUESTS

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Values that must never reach a log line, whatever a message or exception carries. Every
# pattern runs in time linear in its input (they see request paths, which anyone can send):
# one that starts with a run of token characters only starts where such a run starts (the
# lookbehinds), so "eyJeyJeyJ…" is tried once, not once from each of its positions.
_SECRET_PATTERNS = [
    (re.compile(r"(?i)(?<![A-Za-z0-9])(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    # Not after "/": a path segment such as …/token is not a key, and what follows it (say,
    # ": RuntimeError" in a message) is not its value.
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9/])((?:access_token|refresh_token|id_token|code|state|"
            r"client_secret|token|password|x-api-key|authorization)[\"']?\s*[=:]\s*[\"']?)"
            r"[^\s\"'&,;}]+"
        ),
        r"\1[redacted]",
    ),
    (re.compile(r"qbk_[0-9a-f]{8}_[A-Za-z0-9_-]+"), "qbk_[redacted]"),
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
]
MAX_LOGGED_PATH = 256  # characters of a request path that reach a log line
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}  # uvicorn's: the message again, with colour codes


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def loggable_path(path: str) -> str:
    """A request path as logged: at most MAX_LOGGED_PATH characters, marked when cut (redacted
    before the cut, so that no secret is cut where the patterns would no longer see it)."""
    if len(path) <= MAX_LOGGED_PATH:
        return path
    return f"{redact(path)[:MAX_LOGGED_PATH]}…[truncated, {len(path)} chars]"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: redact(value) if isinstance(value, str) else value
        for key, value in record.__dict__.items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": request_id_var.get(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """One line a person reads on a terminal, redacted like the JSON:
    `12:00:01 INFO  service.oauth  message  key=value … [request id]`."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        parts = [f"{when} {record.levelname:<5} {record.name}  {redact(record.getMessage())}"]
        extras = _extras(record)
        if extras:
            parts.append(" ".join(f"{key}={value}" for key, value in extras.items()))
        request_id = request_id_var.get()
        if request_id:
            parts.append(f"[{request_id}]")
        line = "  ".join(parts)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def configure_logging(level: str = "INFO", *, human_on_tty: bool = False) -> None:
    """Logs on stderr: JSON, or (with human_on_tty, when stderr is a terminal) one readable
    line per record."""
    handler = logging.StreamHandler(sys.stderr)
    human = human_on_tty and sys.stderr.isatty()
    handler.setFormatter(ConsoleFormatter() if human else JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The access log would print query strings, and /callback's carry codes and state.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (the last, if sent twice), without building a dict of them all
    on every request."""
    value = None
    for key, found in scope["headers"]:
        if key == name:
            value = found
    return value


class RequestContextMiddleware:
    """Request id in and out, one access log line (path only), metrics by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("qbo_broker.access")
        # (method, route, status) -> its request counter and latency histogram, labelled once.
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = (header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else os.urandom(16).hex()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            key = (method, template, status)
            metrics = self._metrics.get(key)
            if metrics is None:
                metrics = self._metrics[key] = (
                    HTTP_REQUESTS.labels(method, template, str(status)),
                    HTTP_LATENCY.labels(method, template),
                )
            metrics[0].inc()
            metrics[1].observe(elapsed)
            if self.log.isEnabledFor(logging.INFO):  # skip building the line when it is off
                self.log.info(
                    "%s %s %s",
                    scope["method"],
                    template,
                    status,
                    extra={
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "path": loggable_path(scope["path"]),
                    },
                )
            request_id_var.reset(token)
