"""The `qbo-broker` command: serve, migrate, dev, api-key, webhook-endpoint, dev-token,
rotate-keys."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from service.core.config import ConfigurationError, Settings
from service.core.crypto import generate_key

if TYPE_CHECKING:  # for annotations only: each command imports what it runs
    from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="qbo-broker: cieTrade's OAuth 2.0 broker for QuickBooks Online.",
)
api_key_app = typer.Typer(no_args_is_help=True, help="Service API keys.")
app.add_typer(api_key_app, name="api-key")
webhook_app = typer.Typer(no_args_is_help=True, help="Endpoints that receive the broker's events.")
app.add_typer(webhook_app, name="webhook-endpoint")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        _fail(f"invalid configuration: {exc}")
        raise  # unreachable; keeps type checkers content


def _migrated_database(settings: Settings) -> str:
    """The database URL (starting the embedded server if needed), migrated to head."""
    from service.core.db.migrations import upgrade_to_head
    from service.runtime import database_url_for

    url = database_url_for(settings)
    upgrade_to_head(url)
    return url


def _check_stored_key_ids(settings: Settings, url: str) -> None:
    """Refuse to serve when stored secrets are sealed under key ids this configuration lacks:
    every refresh, disconnect and background pass touching them would fail."""
    from service.core.crypto import printable_key_id
    from service.core.db.engine import build_engine, build_sessionmaker
    from service.tokens.rotation import unconfigured_key_ids

    configured = [kid for kid, _ in settings.parsed_encryption_keys]

    async def run() -> dict[str, int]:
        engine = build_engine(url, pool_size=1)
        try:
            async with build_sessionmaker(engine)() as session:
                return await unconfigured_key_ids(session, configured)
        finally:
            await engine.dispose()

    missing = asyncio.run(run())
    if missing:
        listed = ", ".join(
            f"{printable_key_id(kid)} ({count} secrets)" for kid, count in sorted(missing.items())
        )
        _fail(
            f"the database holds secrets encrypted under key ids that BROKER_ENCRYPTION_KEYS "
            f"does not have: {listed}. Add those keys to BROKER_ENCRYPTION_KEYS (after the one "
            f"that encrypts); configured key ids: {', '.join(configured)}"
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Migrate to head (under an advisory lock, so replicas don't race), then serve."""
    import uvicorn

    from service.core.httpserver import server_options
    from service.core.observability import configure_logging

    settings = _settings()
    try:
        settings.check_for_serving()
    except ConfigurationError as exc:
        _fail(str(exc))
    if settings.metrics_port is not None:
        # Each worker process has counters of its own, and only one process can listen on the
        # metrics port: with several workers a scrape would see one worker's counters.
        if workers > 1:
            _fail("BROKER_METRICS_PORT needs --workers 1 (run more replicas instead)")
        if settings.metrics_port == port:
            _fail("BROKER_METRICS_PORT must differ from --port")
    configure_logging(settings.log_level)
    url = _migrated_database(settings)
    _check_stored_key_ids(settings, url)
    # Workers read their settings from the environment; hand them the resolved database.
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("BROKER_METRICS_HOST", host)  # unset: the interface served
    # Request heads are bounded (service.core.httpserver): uvicorn's httptools would buffer any size.
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        log_config=None,
        access_log=False,
        **server_options(),
    )


@app.command()
def worker() -> None:
    """Migrate to head, then run the background work alone (keep-alive, pending-link and
    ticket expiry, the revocation outbox, the webhook sender, the processor of Intuit's
    notifications) until SIGTERM or SIGINT. Run it beside `serve`
    processes started with BROKER_BACKGROUND_ENABLED=false, or not at all: every `serve` runs
    the same work unless told not to."""
    import signal

    from service.core.observability import configure_logging
    from service.worker import run_worker

    settings = _settings()
    try:
        settings.check_for_working()
    except ConfigurationError as exc:
        _fail(str(exc))
    configure_logging(settings.log_level)
    url = _migrated_database(settings)
    _check_stored_key_ids(settings, url)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_worker(settings, stop, database_url=url)

    asyncio.run(main())


@app.command()
def migrate() -> None:
    """Alembic upgrade to head."""
    from service.core.db.migrations import head_revision

    _migrated_database(_settings())
    typer.echo(f"database at {head_revision()}")


@app.command("generate-key")
def generate_key_command(kid: Annotated[str, typer.Option(help="Key id.")] = "k1") -> None:
    """Print a new entry for BROKER_ENCRYPTION_KEYS."""
    typer.echo(f"{kid}:{generate_key()}")


def _jwt_secret(settings: Settings) -> str | None:
    if settings.jwt_secret:
        return settings.jwt_secret
    dev_secret = settings.data_dir / "dev-jwt-secret"
    return dev_secret.read_text().strip() if dev_secret.is_file() else None


@app.command("dev-token")
def dev_token(
    tenant: Annotated[str, typer.Option(help="tenant_id claim.")],
    user: Annotated[str, typer.Option(help="sub claim: the cieTrade user id.")],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 12 * 3600,
) -> None:
    """Print a JWT signed with BROKER_JWT_SECRET (or `dev`'s secret)."""
    from service.auth.jwt import issue_dev_token

    settings = _settings()
    secret = _jwt_secret(settings)
    if not secret:
        _fail("BROKER_JWT_SECRET is not set (and no dev secret exists under BROKER_DATA_DIR)")
        return
    typer.echo(
        issue_dev_token(
            secret,
            tenant_id=tenant,
            user_id=user,
            ttl_seconds=ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


def _in_session(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work(session)` in one transaction on the migrated database."""
    from service.core.db.engine import build_engine, build_sessionmaker

    url = _migrated_database(_settings())  # blocking: Alembic runs its own event loop

    async def run() -> T:
        engine = build_engine(url, pool_size=2)
        try:
            async with build_sessionmaker(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@api_key_app.command("create")
def api_key_create(
    name: Annotated[str, typer.Option(help="Who uses the key.")],
    scope: Annotated[
        list[str], typer.Option(help="status:read, tokens:read or connections:write (repeatable).")
    ],
) -> None:
    """Create a key; the key itself is printed alone on the last line."""
    from service.auth.api_keys import create_api_key, validate_scopes

    try:
        validate_scopes(scope)
    except ValueError as exc:
        _fail(str(exc))

    async def work(session):  # type: ignore[no-untyped-def]
        return await create_api_key(session, name=name, scopes=scope)

    row, key = _in_session(work)
    typer.echo(f"created API key {row.id} ({row.name}) with scopes {' '.join(row.scopes)}")
    typer.echo("store it now; it is not shown again:")
    typer.echo(key)


@api_key_app.command("list")
def api_key_list() -> None:
    """List keys (never the keys themselves)."""
    from service.auth.api_keys import list_api_keys

    rows = _in_session(list_api_keys)
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
        typer.echo(f"{row.id}  {row.name}  qbk_{row.prefix}_…  {','.join(row.scopes)}  {state}")


@api_key_app.command("revoke")
def api_key_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key at once."""
    from service.auth.api_keys import revoke_api_key

    try:
        ident = uuid.UUID(key_id)
    except ValueError:
        _fail(f"not a key id: {key_id!r}")
        return

    async def work(session):  # type: ignore[no-untyped-def]
        return await revoke_api_key(session, ident)

    if not _in_session(work):
        _fail(f"no active key {key_id}")
    typer.echo(f"revoked {key_id}")


def _endpoint_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        _fail(f"not an endpoint id: {text!r}")
        raise  # unreachable


def _box(settings: Settings):  # type: ignore[no-untyped-def]
    from service.core.crypto import SecretBox

    try:
        return SecretBox(settings.parsed_encryption_keys)
    except ConfigurationError as exc:
        _fail(str(exc))


@webhook_app.command("create")
def webhook_create(
    url: Annotated[str, typer.Option(help="https URL of a public host.")],
    event_type: Annotated[
        list[str] | None, typer.Option(help="Only this event type (repeatable); all when left out.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's events.")] = None,
) -> None:
    """Register an endpoint; its signing secret is printed alone on the last line."""
    from pydantic import ValidationError

    from service.auth.callers import Caller
    from service.core.errors import ProblemError
    from service.webhooks import service as webhooks
    from service.webhooks.schemas import WebhookEndpointCreate

    settings = _settings()
    box = _box(settings)
    try:
        body = WebhookEndpointCreate.model_validate(
            {"url": url, "event_types": event_type or None, "tenant_id": tenant}
        )
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        return

    async def work(session):  # type: ignore[no-untyped-def]
        return await webhooks.create(
            session, settings, box, body, caller=Caller(kind="service", subject="cli")
        )

    try:
        endpoint, secret = _in_session(work)
    except ProblemError as exc:
        _fail(exc.detail)
        return
    typer.echo(f"created webhook endpoint {endpoint.id} for {endpoint.url}")
    typer.echo("its signing secret; store it now, it is not shown again:")
    typer.echo(secret)


@webhook_app.command("list")
def webhook_list() -> None:
    """List endpoints (never their secrets)."""
    from service.webhooks import repository

    async def work(session):  # type: ignore[no-untyped-def]
        return (await repository.list_endpoints(session, tenant_id=None, limit=1000, cursor=None))[0]

    for row in _in_session(work):
        state = f"disabled ({row.disabled_reason})" if row.disabled_at else "enabled"
        types = ",".join(row.event_types) if row.event_types else "all events"
        typer.echo(f"{row.id}  {row.url}  tenant={row.tenant_id or 'all'}  {types}  {state}")


@webhook_app.command("delete")
def webhook_delete(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")]) -> None:
    """Delete an endpoint and its deliveries."""
    from service.core.errors import NotFound
    from service.webhooks import service as webhooks

    ident = _endpoint_id(endpoint_id)

    async def work(session):  # type: ignore[no-untyped-def]
        await webhooks.delete(session, await webhooks.load(session, ident, for_update=True))

    try:
        _in_session(work)
    except NotFound:
        _fail(f"no webhook endpoint {endpoint_id}")
    typer.echo(f"deleted {endpoint_id}")


@webhook_app.command("rotate-secret")
def webhook_rotate_secret(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")]) -> None:
    """A new signing secret, printed alone on the last line; the old one signs too for 24 h."""
    from service.core.errors import NotFound
    from service.webhooks import service as webhooks

    box = _box(_settings())
    ident = _endpoint_id(endpoint_id)

    async def work(session):  # type: ignore[no-untyped-def]
        return await webhooks.rotate_secret(
            session, box, await webhooks.load(session, ident, for_update=True)
        )

    try:
        secret, expires = _in_session(work)
    except NotFound:
        _fail(f"no webhook endpoint {endpoint_id}")
        return
    typer.echo(f"rotated; the previous secret keeps signing until {expires:%Y-%m-%dT%H:%M:%SZ}")
    typer.echo("the new signing secret; store it now, it is not shown again:")
    typer.echo(secret)


@app.command("rotate-keys")
def rotate_keys_command(
    batch: Annotated[int, typer.Option(min=1, help="Rows per transaction.")] = 200,
) -> None:
    """Re-encrypt every stored secret under the first key of BROKER_ENCRYPTION_KEYS."""
    from service.core.crypto import SecretBox
    from service.core.db.engine import build_engine, build_sessionmaker
    from service.tokens.rotation import rotate_keys

    settings = _settings()
    try:
        box = SecretBox(settings.parsed_encryption_keys)
    except ConfigurationError as exc:
        _fail(str(exc))
        return

    url = _migrated_database(settings)

    async def run() -> int:
        engine = build_engine(url, pool_size=2)
        try:
            return await rotate_keys(build_sessionmaker(engine), box, batch=batch)
        finally:
            await engine.dispose()

    moved = asyncio.run(run())
    typer.echo(f"re-encrypted {moved} secrets under key {box.primary_kid}")


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="The broker's port.")] = 8000,
    emulator_port: Annotated[int, typer.Option(help="The Intuit emulator's port.")] = 9100,
    host: Annotated[str, typer.Option(help="Interface for both.")] = "127.0.0.1",
) -> None:
    """Embedded PostgreSQL + the local Intuit emulator + the broker, wired together."""
    from service.devserver import run_dev

    run_dev(host=host, port=port, emulator_port=emulator_port)


@app.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Print the OpenAPI document the app serves, as YAML (openapi.yaml is this output)."""
    from service.main import openapi_yaml

    text = openapi_yaml()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def emulator(ctx: typer.Context) -> None:
    """Run the local Intuit emulator (its options: `python -m service.emulator --help`)."""
    from service.emulator.__main__ import main as emulator_main

    emulator_main(ctx.args)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
