"""Direct routes: a documented endpoint's plain form, served without FastAPI's dependency
solving and validation, which cost more than everything else in a cached request.

A direct route sits in the app's own router ahead of the FastAPI route it stands for, with the
same path template. Its `accept` function reads the request's path and query string; the
request is the direct route's when `accept` returns the parsed arguments, and anything it does
not recognise (another query parameter, a form of an id that is not canonical, ...) is declined
so that the documented route answers instead. The endpoint runs in the app, so its exceptions
reach the app's own handlers, and `scope["route"]` names it for the request metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from service.core.metrics import DIRECT_ANSWERS

Accept = Callable[[Scope], dict[str, Any] | None]
Endpoint = Callable[[Request, dict[str, Any]], Awaitable[Response]]


class DirectRoute(BaseRoute):
    def __init__(
        self, path: str, accept: Accept, endpoint: Endpoint, *, methods: Collection[str] = ("GET",)
    ) -> None:
        self.path = path  # the documented route's template: the metrics' route label
        self.methods = frozenset(methods)
        self._accept = accept
        self.endpoint = endpoint
        self._answers = DIRECT_ANSWERS.labels(path)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return Match.NONE, {}
        arguments = self._accept(scope)
        if arguments is None:
            return Match.NONE, {}
        return Match.FULL, {"endpoint": self.endpoint, "route": self, "path_params": arguments}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)  # the documented route has the name

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._answers.inc()
        request = Request(scope, receive)
        response = await self.endpoint(request, scope["path_params"])
        await response(scope, receive, send)
