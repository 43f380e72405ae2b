"""The reference Integration page is `qbo-broker dev`'s alone (tests/test_dev_command.py serves
it there; tests/e2e drives it in a browser)."""

from __future__ import annotations

import httpx

from tests.conftest import Stack


async def test_serve_has_no_integration_page(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.broker_url, timeout=10) as http:
        answer = await http.get("/dev/integration")
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"
