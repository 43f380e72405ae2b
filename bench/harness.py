"""Plumbing shared by the benchmarks: a throwaway database (created and dropped by the tests'
own support code), servers in their own processes on loopback ports, the real Connect flow
walked over HTTP, seeding by COPY, and plain tables.

Not a benchmark itself; the scripts beside it import it (they run as `python bench/NAME.py`, so
this directory is on sys.path).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx

from service.auth.api_keys import create_api_key
from service.auth.jwt import issue_dev_token
from service.core.db.engine import asyncpg_dsn, build_engine, build_sessionmaker
from service.core.db.migrations import upgrade_to_head

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
# The tests' support code (a database per run, free ports, the person at Intuit's pages), shared
# rather than copied: the benchmarks run as `python bench/NAME.py`, so the repository root is not
# on sys.path by itself. The scripts import free_port from here.
sys.path.insert(0, str(ROOT))
from tests.support.database import create_database, drop_database  # noqa: E402
from tests.support.intuit_user import sign_in_and_decide  # noqa: E402
from tests.support.servers import free_port  # noqa: E402, F401

# The same kind of values tests/conftest.py uses; nothing here is a real secret.
JWT_SECRET = "bench-jwt-secret-" + "x" * 32
ENCRYPTION_KEY = "k1:" + base64.b64encode(bytes(range(32))).decode()
CLIENT_ID, CLIENT_SECRET = "bench-client-id", "bench-client-secret"
RETURN_ORIGIN = "https://app.cietrade.test"
RETURN_URL = f"{RETURN_ORIGIN}/integrations/quickbooks"

T = TypeVar("T")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new database migrated by the real Alembic migrations, dropped at the end.

    On DATABASE_URL's server if set, else on an embedded PostgreSQL in a temporary directory
    (stopped by pgserver when this process exits, then the directory is removed).
    """
    # A terminated benchmark still drops its database and stops its servers: SIGTERM unwinds
    # like Ctrl-C, through the finally blocks and atexit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        from service.core.db.embedded import start_embedded_postgres

        tmp = Path(tempfile.mkdtemp(prefix="qbo-bench-pg-"))
        # Registered before pgserver registers its own stop, so it runs after the server stopped.
        atexit.register(shutil.rmtree, tmp, True)
        admin = start_embedded_postgres(tmp, database="postgres")
    url = asyncio.run(create_database(admin))
    try:
        upgrade_to_head(url)
        yield url
    finally:
        asyncio.run(drop_database(admin, url))


async def db_connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(database_url))


async def new_api_key(database_url: str, *scopes: str, name: str = "bench") -> str:
    """An API key created the way `qbo-broker api-key create` does."""
    engine = build_engine(database_url, pool_size=1)
    try:
        async with build_sessionmaker(engine)() as session, session.begin():
            _, key = await create_api_key(session, name=name, scopes=list(scopes))
    finally:
        await engine.dispose()
    return key


CONNECTION_COLUMNS = (
    "id",
    "tenant_id",
    "status",
    "realm_id",
    "company_name",
    "owner_user_id",
    "owner_qb_sub",
    "owner_qb_email",
    "owner_qb_name",
    "module_ar",
    "module_ap",
    "access_token",
    "refresh_token",
    "access_token_expires_at",
    "refresh_token_expires_at",
    "refresh_token_issued_at",
    "keepalive_due_at",
    "last_refreshed_at",
    "connected_at",
    "disconnected_at",
    "created_at",
    "updated_at",
)


async def copy_connections(database_url: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Bulk-load rows shaped like CONNECTION_COLUMNS, then VACUUM ANALYZE as autovacuum would."""
    conn = await db_connect(database_url)
    try:
        await conn.copy_records_to_table("connections", records=rows, columns=CONNECTION_COLUMNS)
        await conn.execute("VACUUM ANALYZE connections")
    finally:
        await conn.close()


def user_headers(tenant: str, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_dev_token(JWT_SECRET, tenant_id=tenant, user_id=user)}"}


# -- processes ---------------------------------------------------------------------------------


def broker_env(database_url: str, *, public_url: str, emulator_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a broker process: tests/conftest.py's broker_settings, as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "INTUIT_", "DATABASE_URL"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "BROKER_PUBLIC_URL": public_url,
            "INTUIT_CLIENT_ID": CLIENT_ID,
            "INTUIT_CLIENT_SECRET": CLIENT_SECRET,
            "INTUIT_DISCOVERY_URL": f"{emulator_url}/.well-known/openid_sandbox_configuration",
            "INTUIT_API_BASE_URL": emulator_url,
            "BROKER_RETURN_URL_ALLOWLIST": RETURN_ORIGIN,
            "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
            "BROKER_JWT_SECRET": JWT_SECRET,
            "BROKER_BACKGROUND_ENABLED": "false",
            "BROKER_LOG_LEVEL": "WARNING",
            "INTUIT_BACKOFF_SECONDS": "0.01",
            "INTUIT_TIMEOUT_SECONDS": "5",
        }
    )
    env.update(overrides)
    return env


def uvicorn_command(
    app: str, port: int, *, app_dir: Path | None = None, log_config: Path | None = None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if app_dir is not None:
        command += ["--app-dir", str(app_dir)]
    if log_config is not None:
        command += ["--log-config", str(log_config)]
    return command


def emulator_command(port: int, *, redirect_uri: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service.emulator",
        "--port",
        str(port),
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--redirect-uri",
        redirect_uri,
        "--log-level",
        "warning",
    ]


class Server:
    """One server process on a loopback port; its output goes to a log file for post-mortems."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        ready_path: str = "/healthz",
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._command = command
        self._env = env
        self._ready_path = ready_path
        self._log = tempfile.NamedTemporaryFile(prefix=f"qbo-bench-{name}-", suffix=".log", delete=False)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 60.0) -> Server:
        self._process = subprocess.Popen(
            self._command, cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited at start:\n{tail}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the process in MB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far, from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """End the process (ours, by its pid) and remove its log."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    started: list[Server] = []
    try:
        for server in servers:
            started.append(server.start())
        yield servers
    finally:
        for server in reversed(started):
            server.stop()


# -- the Intuit emulator and the Connect flow -------------------------------------------------


@dataclass(frozen=True)
class QuickBooksAdmin:
    realm_id: str
    email: str


async def create_companies(emulator_url: str, count: int, *, concurrency: int = 16) -> list[QuickBooksAdmin]:
    """`count` companies, each with its own master admin, through the emulator's control API."""
    admins = [QuickBooksAdmin(realm_id=f"71{i:014d}", email=f"admin{i}@bench.example") for i in range(count)]
    async with httpx.AsyncClient(base_url=f"{emulator_url}/_emulator", timeout=30) as emu:

        async def one(admin: QuickBooksAdmin) -> None:
            (
                await emu.post(
                    "/companies", json={"name": f"Bench Company {admin.realm_id}", "realm_id": admin.realm_id}
                )
            ).raise_for_status()
            (
                await emu.post(
                    "/users",
                    json={
                        "email": admin.email,
                        "given_name": "Bench",
                        "family_name": admin.realm_id[-6:],
                        "companies": {admin.realm_id: "master_admin"},
                    },
                )
            ).raise_for_status()

        await bounded(concurrency, [one(a) for a in admins])
    return admins


async def set_emulator_config(emulator_url: str, **values: int) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        (await http.post(f"{emulator_url}/_emulator/config", json=values)).raise_for_status()


async def emulator_stats(emulator_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{emulator_url}/_emulator/stats")
        response.raise_for_status()
        return dict(response.json())


async def connect_through_flow(
    broker: httpx.AsyncClient, *, tenant: str, user: str, admin: QuickBooksAdmin
) -> str:
    """Create a connection and Connect it as a person would: the broker's authorize, Intuit's
    sign-in and consent forms, and back to the broker's /callback. Returns the connection id."""
    headers = user_headers(tenant, user)
    created = await broker.post("/connections", json={}, headers=headers)
    created.raise_for_status()
    connection_id = str(created.json()["id"])
    started = await broker.post(
        f"/connections/{connection_id}/authorize", json={"return_url": RETURN_URL}, headers=headers
    )
    started.raise_for_status()
    authorization_url = started.json()["authorization_url"]
    # The person at Intuit's pages, as the tests walk them (a browser of its own per flow).
    back = await sign_in_and_decide(authorization_url, email=admin.email)
    location = back.location or ""
    params = parse_qs(urlsplit(location).query)
    result = params.get("result", [""])[0]
    if result == "completion_required":  # ticket mode: the frontend finishes as the same user
        completed = await broker.post(
            f"/connections/{connection_id}/complete",
            headers=headers,
            json={"completion_ticket": params["completion_ticket"][0]},
        )
        result = completed.json().get("status", "") if completed.status_code == 200 else ""
    if result != "connected":
        raise RuntimeError(f"Connect flow for {tenant} ended with {back.status_code} {location!r}")
    return connection_id


async def connect_many(
    broker_url: str, admins: Sequence[QuickBooksAdmin], *, concurrency: int
) -> tuple[list[str], float]:
    """One tenant per company (tenant-i, user-i); returns the connection ids and the seconds."""
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=broker_url, timeout=60, limits=limits) as broker:
        started = time.perf_counter()
        ids = await bounded(
            concurrency,
            [
                connect_through_flow(broker, tenant=f"tenant-{i:06d}", user=f"user-{i:06d}", admin=a)
                for i, a in enumerate(admins)
            ],
        )
        return ids, time.perf_counter() - started


async def bounded(concurrency: int, jobs: Sequence[Awaitable[T]]) -> list[T]:
    """Await the jobs (not yet started coroutines), at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def run(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return list(await asyncio.gather(*(run(job) for job in jobs)))


# -- figures -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
