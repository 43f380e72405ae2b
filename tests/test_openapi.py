"""openapi.yaml is what the app serves: regenerate it with `qbo-broker openapi --output openapi.yaml`."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.main import openapi_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_openapi_yaml_matches_the_app() -> None:
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    served = yaml.safe_load(openapi_yaml())
    assert committed == served, "openapi.yaml is stale: run `uv run qbo-broker openapi --output openapi.yaml`"


async def test_served_document_is_the_committed_one(client) -> None:
    served = (await client.get("/openapi.json")).json()
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert served == committed


def test_both_security_schemes_are_offered() -> None:
    document = yaml.safe_load(openapi_yaml())
    schemes = document["components"]["securitySchemes"]
    assert schemes["UserJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["UserJWT"]["description"],
    }
    assert schemes["ServiceAPIKey"]["in"] == "header"
    assert schemes["ServiceAPIKey"]["name"] == "X-API-Key"
    token_op = document["paths"]["/connections/{connection_id}/token"]["get"]
    assert {"UserJWT": []} in token_op["security"] and {"ServiceAPIKey": []} in token_op["security"]


def test_every_api_operation_documents_database_unavailable() -> None:
    document = yaml.safe_load(openapi_yaml())
    missing = [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        if path.startswith(("/connections", "/status"))
        for method, operation in item.items()
        if "503" not in operation["responses"]
    ]
    assert not missing
