"""`qbo-broker dev`: embedded PostgreSQL, the local Intuit emulator and the broker, wired
together, with a dev JWT and API key printed, so a newcomer can click through Connect."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
from collections.abc import Awaitable
from pathlib import Path

import uvicorn

DEV_TENANT = "dev-tenant"
DEV_USER = "dev-user"
DEV_CLIENT_ID = "dev-client-id"
DEV_CLIENT_SECRET = "dev-client-secret"  # noqa: S105 (the emulator's, never Intuit's)


# Set in the emulator's server task: its uvicorn would say again what the broker's says
# (started, running on, shutting down). Its address is in the banner; its warnings still show.
_EMULATOR_SERVER = contextvars.ContextVar("qbo_broker_dev_emulator_server", default=False)


class _QuietEmulatorServer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _EMULATOR_SERVER.get()


def configure_dev_logging(level: str) -> None:
    """Readable lines on a terminal (JSON otherwise, as `serve` logs), and uvicorn's start-up
    and shutdown lines once, from the broker's server."""
    from service.core.observability import configure_logging

    configure_logging(level, human_on_tty=True)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietEmulatorServer) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_QuietEmulatorServer())


async def _as_emulator_server(serving: Awaitable[None]) -> None:
    _EMULATOR_SERVER.set(True)  # this task's context, and the tasks it starts
    await serving


def dev_secret(path: Path, make: str) -> str:
    """A value kept under BROKER_DATA_DIR so `dev` keeps its keys across restarts."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(make + "\n")
    path.chmod(0o600)
    return make


def new_secret() -> str:
    return secrets.token_urlsafe(48)


def _prepare_environment(host: str, port: int, emulator_port: int) -> Path:
    from service.core.crypto import generate_key

    data_dir = Path(os.environ.get("BROKER_DATA_DIR", "./.broker-data")).resolve()
    emulator_url = f"http://{host}:{emulator_port}"
    defaults = {
        "BROKER_DATA_DIR": str(data_dir),
        "BROKER_PUBLIC_URL": f"http://localhost:{port}",
        "INTUIT_CLIENT_ID": DEV_CLIENT_ID,
        "INTUIT_CLIENT_SECRET": DEV_CLIENT_SECRET,
        "INTUIT_DISCOVERY_URL": f"{emulator_url}/.well-known/openid_sandbox_configuration",
        "INTUIT_API_BASE_URL": emulator_url,
        "BROKER_RETURN_URL_ALLOWLIST": f"http://localhost:{port},http://127.0.0.1:{port}",
        "BROKER_ENCRYPTION_KEYS": "dev:" + dev_secret(data_dir / "dev-encryption-key", generate_key()),
        "BROKER_JWT_SECRET": dev_secret(data_dir / "dev-jwt-secret", new_secret()),
        # The emulator signs its webhooks with this; the broker verifies them with it.
        "INTUIT_WEBHOOK_VERIFIER_TOKENS": dev_secret(data_dir / "dev-intuit-webhook-token", new_secret()),
        # Local receivers (plain http, this machine) may get webhooks.
        "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    os.environ["BROKER_DOCS"] = "true"  # dev is for clicking through Swagger UI, whatever else is set
    return data_dir


async def _dev_api_key(data_dir: Path, database_url: str) -> str:
    from service.auth.api_keys import create_api_key, find_active_key
    from service.auth.callers import Scope
    from service.core.db.engine import build_engine, build_sessionmaker

    engine = build_engine(database_url, pool_size=1)
    saved = data_dir / "dev-api-key"
    every_scope = [scope.value for scope in Scope]
    try:
        async with build_sessionmaker(engine)() as session, session.begin():
            # A key saved by an older version lacks newer scopes: make a new one then.
            row = await find_active_key(session, saved.read_text().strip()) if saved.is_file() else None
            if row is not None and set(every_scope) <= set(row.scopes):
                return saved.read_text().strip()
            _, key = await create_api_key(session, name="dev", scopes=every_scope)
    finally:
        await engine.dispose()
    saved.write_text(key + "\n")
    saved.chmod(0o600)
    return key


def run_dev(*, host: str, port: int, emulator_port: int) -> None:
    from service.auth.jwt import issue_dev_token
    from service.core.config import Settings
    from service.core.db.migrations import upgrade_to_head
    from service.core.httpserver import server_options
    from service.emulator import EmulatorSettings
    from service.emulator import create_app as create_emulator
    from service.integration_page import PAGE_PATH, install_integration_page
    from service.main import create_app
    from service.runtime import database_url_for

    data_dir = _prepare_environment(host, port, emulator_port)
    settings = Settings()
    configure_dev_logging(settings.log_level)
    database_url = database_url_for(settings)
    os.environ["DATABASE_URL"] = database_url
    upgrade_to_head(database_url)
    settings = Settings()
    api_key = asyncio.run(_dev_api_key(data_dir, database_url))
    assert settings.jwt_secret is not None
    jwt = issue_dev_token(settings.jwt_secret, tenant_id=DEV_TENANT, user_id=DEV_USER)

    emulator = create_emulator(
        EmulatorSettings(
            public_url=f"http://{host}:{emulator_port}",
            client_id=DEV_CLIENT_ID,
            client_secret=DEV_CLIENT_SECRET,
            redirect_uris=[settings.redirect_uri],
            state_file=str(data_dir / "emulator-state.json"),
            # Intuit's webhooks of data changes go to the dev broker, signed with its first token.
            webhook_url=f"http://{host}:{port}/intuit/webhooks",
            webhook_verifier_token=next(iter(settings.intuit_webhook_verifier_tokens), None),
        )
    )
    emulator_server = uvicorn.Server(
        uvicorn.Config(emulator, host=host, port=emulator_port, log_config=None, access_log=False)
    )
    broker = create_app(settings)
    jwt_secret = settings.jwt_secret
    install_integration_page(
        broker,
        lambda user: issue_dev_token(jwt_secret, tenant_id=DEV_TENANT, user_id=user),
        default_user=DEV_USER,
    )
    # serve's protocol: bounded request heads, and open event streams ended at shutdown.
    broker_server = uvicorn.Server(
        uvicorn.Config(broker, host=host, port=port, log_config=None, access_log=False, **server_options())
    )
    print(
        f"""
qbo-broker dev is starting.

  Swagger UI        http://localhost:{port}/docs
  Integration page  http://localhost:{port}{PAGE_PATH}  (Connect, modules, live status)
  Intuit emulator   http://{host}:{emulator_port}  (sign in as alice@example.com, an admin)
  Data              {data_dir}  (kept across restarts)
  Intuit webhooks   the emulator's data changes → http://{host}:{port}/intuit/webhooks

  Dev user JWT (tenant {DEV_TENANT}, user {DEV_USER}); paste into Authorize → UserJWT:
{jwt}

  Dev service API key (all scopes); paste into Authorize → ServiceAPIKey:
{api_key}

  Try: POST /connections; POST /connections/{{id}}/authorize with
  {{"return_url": "http://localhost:{port}/docs"}}; open authorization_url and Connect; back on
  /docs, copy completion_ticket from the address bar into POST /connections/{{id}}/complete.
""",
        flush=True,
    )

    async def serve_all() -> None:
        await asyncio.gather(_as_emulator_server(emulator_server.serve()), broker_server.serve())

    asyncio.run(serve_all())
