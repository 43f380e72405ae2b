"""uvicorn's HTTP protocol for `serve`, with a bound on the size of a request's head.

httptools (uvicorn's fast parser) buffers a header of any size before handing it over: a client
could send megabytes of headers that the app then has to read. This protocol counts the bytes of
each request head (request line and headers) as they arrive and answers 431 once they pass
MAX_REQUEST_HEAD_BYTES, before the parser has buffered more. With h11 (uvicorn's fallback when
httptools is missing) the same bound is h11's own limit.
"""

from __future__ import annotations

import json
from typing import Any

from service.core.errors import PROBLEM_CONTENT_TYPE, ProblemError

# Room for an 8 KB bearer token (service.auth.jwt) and the usual headers and cookies.
MAX_REQUEST_HEAD_BYTES = 32 * 1024
# A long-lived response (an event stream) puts a callable under this key of its scope: the
# server calls it at shutdown, so the response ends instead of keeping the server waiting.
END_STREAM_SCOPE_KEY = "qbo_broker.end_stream"


def _refusal() -> bytes:
    error = ProblemError("The request's header fields are too large.")
    error.status, error.code, error.title = 431, "http_error", "Request header fields too large"
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: " + PROBLEM_CONTENT_TYPE.encode() + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover (uvicorn[standard] brings httptools)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """HttpToolsProtocol that refuses a request head over MAX_REQUEST_HEAD_BYTES with 431."""

        max_head_bytes = MAX_REQUEST_HEAD_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # the bytes arriving belong to a request line or headers
            self._head_budget = self.max_head_bytes

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_budget = True, self.max_head_bytes

        def data_received(self, data: bytes) -> None:
            while data:
                if not self._in_head or len(data) <= self._head_budget:
                    if self._in_head:
                        self._head_budget -= len(data)
                    super().data_received(data)
                    return
                # Feed what the budget allows: the head may end in it, the rest being a body.
                piece, data = data[: self._head_budget], data[self._head_budget :]
                self._head_budget = 0
                if piece:
                    super().data_received(piece)
                if self.transport.is_closing():
                    return
                if self._in_head:
                    self._refuse()
                    return

        def shutdown(self) -> None:
            # uvicorn lets a response in progress finish before it stops (and only then runs
            # the app's lifespan shutdown): an open event stream would never finish.
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                end_stream = cycle.scope.get(END_STREAM_SCOPE_KEY)
                if callable(end_stream):
                    end_stream()
            super().shutdown()

        def _refuse(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no answer being written
                self.transport.write(_refusal())
            self.transport.close()


def server_options() -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config options that bound request heads."""
    http = "service.core.httpserver:BoundedHttpToolsProtocol" if HttpToolsProtocol is not None else "h11"
    return {"http": http, "h11_max_incomplete_event_size": MAX_REQUEST_HEAD_BYTES}
