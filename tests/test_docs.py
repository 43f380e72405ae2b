"""Swagger UI at /docs loads everything from the broker; BROKER_DOCS turns /docs, its assets and
/openapi.json on and off (off by default on production)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.core.config import Settings
from service.devserver import _prepare_environment
from service.docs import ASSETS, assets_path
from service.main import create_app
from tests.conftest import Stack, broker_settings
from tests.support.servers import ThreadedServer, free_port

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r'(?:src|href)="([^"]*)"')
DOCUMENT = re.compile(r"url: '([^']*)'")
# How the first bytes of each asset look.
SIGNATURES = {
    "swagger-ui-bundle.js": b"SwaggerUIBundle",
    "swagger-ui.css": b".swagger-ui",
    "favicon.png": b"\x89PNG",
}


async def test_docs_page_loads_only_assets_the_broker_serves(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "http" not in page.text and "//" not in page.text  # nothing names another host

    references = REFERENCE.findall(page.text)
    assert sorted(references) == sorted(f"{assets_path()}/{name}" for name in ASSETS)
    for reference in references:
        asset = await client.get(reference)
        name = reference.rsplit("/", 1)[1]
        assert asset.status_code == 200, reference
        assert asset.headers["content-type"] == ASSETS[name]
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert SIGNATURES[name] in asset.content[:2000], name

    assert DOCUMENT.findall(page.text) == ["/openapi.json"]
    document = await client.get("/openapi.json")
    assert document.status_code == 200
    assert set(document.json()["components"]["securitySchemes"]) == {"UserJWT", "ServiceAPIKey"}


async def test_docs_page_keeps_authorization_and_asks_no_validator(client: httpx.AsyncClient) -> None:
    page = (await client.get("/docs")).text
    assert '"persistAuthorization": true' in page
    assert '"validatorUrl": null' in page


@pytest.mark.parametrize("path", ["redoc.standalone.js", "..%2Fcore.py", "%2E%2E%2Fcore.py", "swagger-ui.js"])
async def test_only_the_pages_assets_are_served(client: httpx.AsyncClient, path: str) -> None:
    answer = await client.get(f"{assets_path()}/{path}")
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"


async def test_redoc_and_oauth2_redirect_are_not_served(client: httpx.AsyncClient) -> None:
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert (await client.get(path)).status_code == 404, path


@pytest.mark.parametrize(
    ("docs", "environment", "enabled"),
    [
        (None, "sandbox", True),
        (None, "production", False),
        ("", "production", False),
        ("true", "production", True),
        ("false", "sandbox", False),
        ("0", "sandbox", False),
    ],
)
def test_broker_docs_switch(
    monkeypatch: pytest.MonkeyPatch, docs: str | None, environment: str, enabled: bool
) -> None:
    monkeypatch.setenv("INTUIT_ENVIRONMENT", environment)
    if docs is None:
        monkeypatch.delenv("BROKER_DOCS", raising=False)
    else:
        monkeypatch.setenv("BROKER_DOCS", docs)
    assert Settings().docs_enabled is enabled


def test_broker_docs_refuses_what_is_not_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_DOCS", "sometimes")
    with pytest.raises(ValueError, match="BROKER_DOCS"):
        Settings()


def test_dev_always_serves_docs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "BROKER_DATA_DIR": str(tmp_path),
        "BROKER_DOCS": "false",
        "INTUIT_ENVIRONMENT": "production",
    }
    monkeypatch.setattr(os, "environ", environment)  # what dev sets stays in this test
    _prepare_environment("127.0.0.1", free_port(), free_port())
    assert Settings().docs_enabled is True


@pytest.fixture(scope="module")
def production_broker(stack: Stack) -> Iterator[str]:
    """A broker with INTUIT_ENVIRONMENT=production and BROKER_DOCS unset."""
    port = free_port()
    settings = broker_settings(
        stack.database_url, port, stack.emulator_url, INTUIT_ENVIRONMENT="production", BROKER_DOCS=None
    )
    assert not settings.docs_enabled
    server = ThreadedServer(create_app(settings), port).start()
    yield server.url
    server.stop()


@pytest.fixture
async def production(production_broker: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=production_broker, timeout=30) as http:
        yield http


async def test_docs_off_answer_like_unknown_paths(production: httpx.AsyncClient) -> None:
    unknown = await production.get("/no-such-page")
    assert unknown.status_code == 404
    for path in ("/docs", f"{assets_path()}/swagger-ui-bundle.js", "/openapi.json", "/redoc"):
        answer = await production.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json() == unknown.json(), path
    assert (await production.get("/healthz")).status_code == 200  # the API itself is there


def test_document_is_built_with_docs_off() -> None:
    # As openapi_yaml() builds it, for `qbo-broker openapi` and tests/test_openapi.py.
    app = create_app(Settings(BROKER_RETURN_URL_ALLOWLIST=[], BROKER_DOCS=False))  # type: ignore[call-arg]
    assert app.openapi_url is None
    assert app.openapi() == yaml.safe_load((ROOT / "openapi.yaml").read_text())
