"""`serve`'s HTTP server bounds a request's head: megabytes of headers are refused with 431
before they are buffered, while requests of ordinary (and 8 KB-token) size pass."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.core.httpserver import MAX_REQUEST_HEAD_BYTES, server_options
from tests.support.servers import free_port


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"authorization": len(request.headers.get("authorization", "")), "body": len(body)})


@contextmanager
def _running(options: dict[str, Any]) -> Iterator[int]:
    port = free_port()
    app = Starlette(routes=[Route("/echo", _echo, methods=["GET", "POST"])])
    instance = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off", **options
        )
    )
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        assert thread.is_alive()
        time.sleep(0.02)
    try:
        yield port
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module", params=["serve", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    """`serve`'s options, and uvicorn's fallback to h11 (without httptools) with them."""
    options = server_options()
    if request.param == "h11":
        options["http"] = "h11"
    else:
        assert options["http"] == "service.core.httpserver:BoundedHttpToolsProtocol"
    with _running(options) as port:
        yield port


@pytest.fixture(scope="module")
def bounded() -> Iterator[int]:
    with _running(server_options()) as port:
        yield port


def _exchange(port: int, head: bytes, body: bytes = b"", *, chunk: int = 65536) -> bytes:
    """Send a request (in pieces, as a client would) and read the answer until the server is
    done. A server that stops reading and closes may reset the connection mid-send."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = head + body
        try:
            for start in range(0, len(data), chunk):
                sock.sendall(data[start : start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
                if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                    length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(answer.split(b"\r\n\r\n", 1)[1]) >= length:
                        break
        except ConnectionResetError:
            pass
        return answer


def _request(token_bytes: int, *, method: str = "GET", body: bytes = b"") -> bytes:
    return (
        f"{method} /echo HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer ".encode()
        + b"a" * token_bytes
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )


def test_an_ordinary_head_and_an_8_kb_token_pass(server: int) -> None:
    answer = _exchange(server, _request(8 * 1024))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"authorization":8199' in answer


def test_a_large_body_after_a_small_head_is_not_counted_as_head(server: int) -> None:
    body = b"x" * (3 * MAX_REQUEST_HEAD_BYTES)
    answer = _exchange(server, _request(100, method="POST", body=body), body, chunk=len(body) + 1000)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert f'"body":{len(body)}'.encode() in answer


def test_megabytes_of_headers_are_refused(server: int, request: pytest.FixtureRequest) -> None:
    started = time.perf_counter()
    answer = _exchange(server, _request(8 * 1024 * 1024))
    elapsed = time.perf_counter() - started
    if "h11" in request.node.callspec.id:
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]  # uvicorn's answer to h11's limit
    else:
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert b"application/problem+json" in answer and b'"code":"http_error"' in answer
    assert elapsed < 1.0, elapsed


def test_just_over_the_bound_is_refused(bounded: int) -> None:
    # (h11 bounds only what it holds while a head is incomplete, so only the default here.)
    answer = _exchange(bounded, _request(MAX_REQUEST_HEAD_BYTES + 1))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # A head that arrives byte by byte is cut off at the bound too.
    with socket.create_connection(("127.0.0.1", bounded), timeout=5) as sock:
        try:
            sock.sendall(b"GET /echo HTTP/1.1\r\nX-Slow: ")
            for _ in range(MAX_REQUEST_HEAD_BYTES // 1024 + 2):
                sock.sendall(b"b" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sock.recv(100).startswith(b"HTTP/1.1 431")
    # The next connection is served as usual.
    assert _exchange(bounded, _request(10)).startswith(b"HTTP/1.1 200")


def test_keep_alive_requests_each_get_their_own_budget(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        for _ in range(8):  # 8 × 20 KB of heads on one connection: each is within the bound
            sock.sendall(_request(20 * 1024))
            answer = b""
            while b'"body":0}' not in answer:
                part = sock.recv(65536)
                assert part, answer
                answer += part
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
