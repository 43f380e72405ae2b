"""`qbo-broker webhook-endpoint`, run as an operator would run it."""

from __future__ import annotations

from standardwebhooks.webhooks import Webhook

from tests.conftest import ENCRYPTION_KEY, user_headers
from tests.test_cli import run


async def test_create_list_rotate_delete(stack, client, receivers, senders) -> None:
    env = {
        "DATABASE_URL": stack.database_url,
        "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
        "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    receiver, url = receivers()
    created = run("webhook-endpoint", "create", "--url", url, "--event-type", "connection.created", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_") and " " not in secret
    listed = run("webhook-endpoint", "list", env=env)
    assert url in listed.stdout and "connection.created" in listed.stdout
    assert secret not in listed.stdout
    endpoint_id = listed.stdout.split()[0]

    rotated = run("webhook-endpoint", "rotate-secret", endpoint_id, env=env)
    assert rotated.returncode == 0, rotated.stderr
    new_secret = rotated.stdout.strip().splitlines()[-1]
    assert new_secret.startswith("whsec_") and new_secret != secret

    assert (await client.post("/connections", json={}, headers=user_headers())).status_code == 201
    await (await senders()).drain()
    (got,) = receiver.received
    Webhook(secret).verify(got.body, got.headers)
    Webhook(new_secret).verify(got.body, got.headers)

    deleted = run("webhook-endpoint", "delete", endpoint_id, env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert endpoint_id not in run("webhook-endpoint", "list", env=env).stdout
    again = run("webhook-endpoint", "delete", endpoint_id, env=env)
    assert again.returncode == 2 and "no webhook endpoint" in again.stderr


def test_create_refuses_what_the_api_refuses(stack) -> None:
    env = {"DATABASE_URL": stack.database_url, "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY}
    private = run("webhook-endpoint", "create", "--url", "https://127.0.0.1/hooks", env=env)
    assert private.returncode == 2 and "public addresses" in private.stderr
    unknown = run(
        "webhook-endpoint",
        "create",
        "--url",
        "https://93.184.216.34/",
        "--event-type",
        "connection.renamed",
        env=env,
    )
    assert unknown.returncode == 2 and "event_types" in unknown.stderr
