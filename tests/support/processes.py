"""Brokers as real, separate operating-system processes, as replicas run in production.

Threads in the test process share one interpreter, one event loop per thread and one set of
Python objects; only separate processes prove what holds *across* replicas (the database row
lock, committed state) and what a crash (SIGKILL) leaves behind. Each process writes its
stdout and stderr to files, so a failing test can show what the broker said.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.core.config import Settings
from tests.support.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PYCACHE = Path(tempfile.gettempdir()) / "qbo-broker-test-pycache"


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment variables that make a broker process read exactly these settings."""
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if field.alias is None or value is None:
            continue
        if isinstance(value, bool):
            env[field.alias] = "true" if value else "false"
        elif isinstance(value, list):
            env[field.alias] = ",".join(value)
        else:
            env[field.alias] = str(value)
    for key, value in overrides.items():
        env[key] = "true" if value is True else "false" if value is False else str(value)
    return env


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment minus any broker setting it carries, plus `env`.

    Bytecode is cached outside the working tree: without it every process compiles all of its
    libraries again, which takes seconds per start.
    """
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    inherited = {k: v for k, v in os.environ.items() if k not in aliases and k != "PYTHONDONTWRITEBYTECODE"}
    return {**inherited, "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(PYCACHE), **env}


class BrokerProcess:
    """`python -m uvicorn service.main:create_app --factory` on a free loopback port."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "BROKER_PUBLIC_URL": self.url}
        self.stdout_path = log_dir / f"broker-{name}-{self.port}.out.log"
        self.stderr_path = log_dir / f"broker-{name}-{self.port}.err.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def spawn(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._process = subprocess.Popen(  # noqa: S603 (a fixed command line)
                # Keep-alive longer than any pause in a test, so a reused connection is never
                # closed by the server at the moment the next request goes out on it.
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "service.main:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--timeout-keep-alive",
                    "120",
                ],
                cwd=REPO_ROOT,
                env=process_env(self.env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Block until GET /healthz answers 200; raise with the broker's output if it never does."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while True:
                if not self.running:
                    raise RuntimeError(f"broker {self.name} exited during startup:\n{self.output()}")
                try:
                    if http.get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker {self.name} not healthy after {timeout}s:\n{self.output()}")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a host or container dies."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it takes too long."""
        if not self.running:
            return
        self._signal(signal.SIGTERM)
        assert self._process is not None
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, signum: int) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signum)
        if signum == signal.SIGKILL:
            self._process.wait(10)

    def output(self, tail: int = 4000) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


class BrokerProcesses:
    """Starts broker processes and guarantees they are all gone at the end (call close())."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._started: list[BrokerProcess] = []

    def spawn(self, name: str, env: Mapping[str, str]) -> BrokerProcess:
        """Start a process without waiting for it (see ready())."""
        broker = BrokerProcess(name, env, self.log_dir)
        self._started.append(broker)  # registered first: cleaned up whatever happens next
        broker.spawn()
        return broker

    async def ready(self, *brokers: BrokerProcess) -> None:
        """Wait until every one of them answers /healthz; they start up in parallel."""
        await asyncio.gather(*(asyncio.to_thread(b.wait_healthy) for b in brokers))

    async def start(self, env: Mapping[str, str], *names: str) -> list[BrokerProcess]:
        """One process per name, all with the same settings, started in parallel."""
        brokers = [self.spawn(name, env) for name in names]
        await self.ready(*brokers)
        return brokers

    def close(self) -> None:
        for broker in self._started:
            broker.stop()
        self._started.clear()


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    args: list[str], env: Mapping[str, str], log_dir: Path, *, time_limit: float = 120.0
) -> CommandResult:
    """Run `python -m service ARGS` (the qbo-broker command) in its own process, off the loop."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 (a fixed command line)
            [sys.executable, "-m", "service", *args],
            cwd=REPO_ROOT,
            env=process_env(env),
            capture_output=True,
            text=True,
            timeout=time_limit,
            check=False,
        )

    done = await asyncio.to_thread(run)
    (log_dir / f"cli-{args[0]}.out.log").write_text(done.stdout)
    (log_dir / f"cli-{args[0]}.err.log").write_text(done.stderr)
    return CommandResult(done.returncode, done.stdout, done.stderr)
