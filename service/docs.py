"""Swagger UI at /docs, with its JavaScript, CSS and favicon served by the broker itself.

FastAPI's own page loads them from a public CDN, so on a machine without internet access it
stays blank. The files come from the `fastapi-offline` package (pinned in uv.lock), under a path
that names the package's version: a browser may cache them for a year, and an upgrade changes
the URLs. The page makes no request to any other host.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from service.core.config import Settings

DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
_PACKAGE = "fastapi-offline"
# The files the page loads, and what they are; nothing else in the package is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
_ASSET_CACHE = "public, max-age=31536000, immutable"


def assets_path() -> str:
    """Where the assets are served: versioned, so a cached copy never outlives an upgrade."""
    return f"{DOCS_PATH}/assets/{metadata.version(_PACKAGE)}"


def _assets_dir() -> Path:
    directory = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (directory / name).is_file()]
    if missing:  # a package upgrade that moved its files: fail at startup, not with a blank page
        raise RuntimeError(f"{_PACKAGE} has no {', '.join(missing)} under {directory}")
    return directory


def swagger_ui_parameters(settings: Settings) -> dict[str, Any]:
    return {
        # Keep what was pasted into Authorize across reloads (browser storage), except on a
        # production broker, where a JWT or API key should not outlive the tab.
        "persistAuthorization": settings.intuit_environment != "production",
        # Swagger UI would otherwise ask validator.swagger.io about the document.
        "validatorUrl": None,
    }


def install_docs(app: FastAPI, settings: Settings) -> None:
    """/docs and its assets. Call only when docs are on: otherwise both are unknown paths."""
    directory = _assets_dir()
    assets = assets_path()
    parameters = swagger_ui_parameters(settings)

    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_PATH}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets}/favicon.png",
            swagger_ui_parameters=parameters,
        )
        # The page is small and names the current assets: always revalidated.
        page.headers["Cache-Control"] = "no-cache"
        return page

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404)
        return FileResponse(
            directory / name,
            media_type=media_type,
            headers={"Cache-Control": _ASSET_CACHE, "X-Content-Type-Options": "nosniff"},
        )

    app.add_route(DOCS_PATH, swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_route(f"{assets}/{{name}}", asset, methods=["GET"], include_in_schema=False)
