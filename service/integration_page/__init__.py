"""/dev/integration: the reference Integration page, served by `qbo-broker dev` only.

The page (integration.html, one file) uses nothing but the broker's public API and its event
stream, as cieTrade's frontend would. Its user's JWT is written into the page itself: dev runs on
the developer's machine, and this is the one way a page can hold a token that never appears in a
URL. `serve` never installs it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse

PAGE_PATH = "/dev/integration"
USER_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"


def install_integration_page(app: FastAPI, issue_token: Callable[[str], str], *, default_user: str) -> None:
    """Serve the page at PAGE_PATH; `issue_token(user)` gives that user's JWT (`?user=` picks
    another user of the dev tenant, to act as a colleague)."""
    template = resources.files(__package__).joinpath("integration.html").read_text()

    @app.get(PAGE_PATH, include_in_schema=False)
    async def integration_page(
        user: Annotated[str, Query(pattern=USER_PATTERN)] = default_user,
    ) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        # In a <script type="application/json">: "<" escaped, so nothing in it ends the element.
        config = json.dumps({"token": issue_token(user), "user": user}).replace("<", "\\u003c")
        page = template.replace("__CONFIG__", config).replace("__NONCE__", nonce)
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
                ),
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )
