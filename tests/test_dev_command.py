"""`qbo-broker dev` as a newcomer runs it: everything wired, Connect works, data survives a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.intuit_user import sign_in_and_decide
from tests.support.servers import free_port
from tests.support.waiting import until


@contextmanager
def dev_process(data_dir: Path, port: int, emulator_port: int, log: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "INTUIT_", "DATABASE_"))}
    env["BROKER_DATA_DIR"] = str(data_dir)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "dev",
                "--port",
                str(port),
                "--emulator-port",
                str(emulator_port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        text = log.read_text()
        jwt = re.search(r"UserJWT:\n(\S+)", text)
        key = re.search(r"ServiceAPIKey:\n(\S+)", text)
        assert jwt and key, text
        assert f"http://localhost:{port}/docs" in text
        yield {"jwt": jwt.group(1), "api_key": key.group(1)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_dev_connects_and_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port, emulator_port = free_port(), free_port()
    broker = f"http://127.0.0.1:{port}"
    with dev_process(data_dir, port, emulator_port, tmp_path / "dev-1.log") as first:
        user = {"Authorization": f"Bearer {first['jwt']}"}
        async with httpx.AsyncClient(base_url=broker, timeout=30) as http:
            assert (await http.get("/docs")).status_code == 200
            created = await http.post("/connections", json={}, headers=user)
            assert created.status_code == 201, created.text
            cid = created.json()["id"]
            # The README's walk-through: back to /docs with a ticket, redeemed by the same user.
            started = await http.post(
                f"/connections/{cid}/authorize",
                headers=user,
                json={"return_url": f"http://localhost:{port}/docs"},
            )
            assert started.status_code == 200, started.text
            url = started.json()["authorization_url"]
            assert url.startswith(f"http://127.0.0.1:{emulator_port}/connect/oauth2?")
            result = await sign_in_and_decide(url, email="alice@example.com", realm_id="9341452988354102")
            assert result.status_code == 303
            assert result.location.startswith(f"http://localhost:{port}/docs?")
            assert result.params["result"] == "completion_required"
            done = await http.post(
                f"/connections/{cid}/complete",
                headers=user,
                json={"completion_ticket": result.params["completion_ticket"]},
            )
            assert done.status_code == 200, done.text
            assert (await http.get(f"/connections/{cid}", headers=user)).json()["status"] == "connected"
            await _integration_page_is_served(http)

    with dev_process(data_dir, port, emulator_port, tmp_path / "dev-2.log") as second:
        assert second["api_key"] == first["api_key"]  # kept under BROKER_DATA_DIR
        async with httpx.AsyncClient(base_url=broker, timeout=30) as http:
            body = (
                await http.get(f"/connections/{cid}", headers={"Authorization": f"Bearer {second['jwt']}"})
            ).json()
            assert body["status"] == "connected"
            # The emulator kept its grants too: a forced refresh with the stored token works.
            token = await http.get(
                f"/connections/{cid}/token",
                params={"force_refresh": "true"},
                headers={"X-API-Key": second["api_key"]},
            )
            assert token.status_code == 200, token.text
        # Intuit's webhooks: a change made through the Accounting API reaches the dev broker,
        # signed with the verifier token dev generated (a wrong one is answered 401).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator_port}", timeout=30) as emulator:
            changed = await emulator.post(
                "/v3/company/9341452988354102/customer",
                json={"DisplayName": "Webhook Test"},
                headers={
                    "Authorization": f"Bearer {token.json()['access_token']}",
                    "Accept": "application/json",
                },
            )
            assert changed.status_code == 200, changed.text

            async def delivered() -> bool:
                deliveries = (await emulator.get("/_emulator/webhooks/deliveries")).json()
                return any(d.get("status") == 200 for d in deliveries)

            await until(delivered, "the emulator's webhook to reach the dev broker")
            hook = (await emulator.get("/_emulator/webhooks")).json()
            assert hook["url"] == f"http://127.0.0.1:{port}/intuit/webhooks"

    # Not on a terminal, the logs are JSON; uvicorn's start-up and shutdown lines come once, from
    # the broker's server (the emulator's would repeat them).
    log = (tmp_path / "dev-2.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("{")]
    messages = [json.loads(line)["message"] for line in lines]
    for said in (
        "Started server process",
        "Waiting for application startup.",
        "Application startup complete.",
        "Uvicorn running on",
        "Shutting down",
        "Finished server process",
    ):
        assert sum(message.startswith(said) for message in messages) == 1, (said, messages)
    assert [m for m in messages if m.startswith("Uvicorn running on")] == [
        f"Uvicorn running on http://127.0.0.1:{port} (Press CTRL+C to quit)"
    ]


async def _integration_page_is_served(http: httpx.AsyncClient) -> None:
    """dev serves the reference Integration page, carrying a JWT of the dev tenant (its only
    way to the API), with a strict policy: its own nonce'd script, requests to itself only."""
    page = await http.get("/dev/integration")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    policy = page.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in page.text
    assert "connect-src 'self'" in policy
    config = re.search(r'<script type="application/json" id="config">(.*?)</script>', page.text)
    assert config, page.text[:500]
    token = json.loads(config.group(1))["token"]
    status = await http.get("/status", headers={"Authorization": f"Bearer {token}"})
    assert status.status_code == 200 and status.json()["tenant_id"] == "dev-tenant"
    colleague = await http.get("/dev/integration", params={"user": "dev-user-2"})
    assert colleague.status_code == 200
    assert (await http.get("/dev/integration", params={"user": "<script>"})).status_code == 422
