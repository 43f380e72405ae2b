"""The package as an operator installs it: a built wheel in a fresh venv, run from elsewhere.

The wheel is built from this checkout and installed with the locked dependency versions (so uv's
cache serves them); every command then runs from an empty temporary directory with a clean
environment, so nothing of the checkout (alembic.ini, alembic/, service/) can be found by accident.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from tests.support import database
from tests.support.db_helpers import fetchrow

ROOT = Path(__file__).resolve().parent.parent
# Where the wheel carries the top-level alembic/ folder (pyproject.toml, force-include).
PACKAGED_MIGRATIONS = "service/migrations"


@dataclass
class Installed:
    wheel: Path
    bin: Path  # the venv's bin directory
    workdir: Path  # an empty directory outside the checkout, the commands' working directory


def _uv() -> str:
    # `uv run` tells its children where uv is; otherwise it must be on PATH (.ci/run installs it).
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is needed to build and install the wheel"
    return uv


def _run(
    args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could point Python or the broker at the checkout."""
    dropped = (
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "UV_PROJECT_ENVIRONMENT",
        "DATABASE_URL",
    )
    env = {
        k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(("BROKER_", "INTUIT_"))
    }
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # A directory of our own: pytest prunes its tmp tree when other runs start meanwhile.
    with tempfile.TemporaryDirectory(prefix="qbo-install-") as tmp:
        yield _install(Path(tmp))


def _install(base: Path) -> Installed:
    uv, env = _uv(), _clean_env()
    _run([uv, "build", "--wheel", "--out-dir", base / "dist", ROOT], cwd=base, env=env)
    (wheel,) = (base / "dist").glob("qbo_broker-*.whl")
    # The lock's versions, as constraints: an operator's pip may pick newer ones, but the test
    # is about the package's own contents and must not depend on what PyPI published today.
    constraints = base / "constraints.txt"
    _run(
        [
            uv,
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--no-hashes",
            "--directory",
            ROOT,
            "--output-file",
            constraints,
        ],
        cwd=base,
        env=env,
    )
    venv = base / "venv"
    _run([uv, "venv", "--quiet", "--python", os.path.realpath(sys.executable), venv], cwd=base, env=env)
    _run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            venv / "bin" / "python",
            "--constraints",
            constraints,
            wheel,
        ],
        cwd=base,
        env=env,
    )
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(wheel=wheel, bin=venv / "bin", workdir=workdir)


def test_the_wheel_carries_the_migrations(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    sources = {
        p.relative_to(ROOT / "alembic").as_posix()
        for p in (ROOT / "alembic").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert {"env.py", "versions/0001_initial_schema.py"} <= sources
    missing = {s for s in sources if f"{PACKAGED_MIGRATIONS}/{s}" not in names}
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.endswith("alembic.ini")], "no ini file is needed at run time"


def test_migrate_and_serve_from_an_installed_wheel(installed: Installed, database_url: str) -> None:
    env = _clean_env(BROKER_DATA_DIR=str(installed.workdir / "data"))
    # The installed package is the venv's own, not this checkout's.
    where = _run(
        [installed.bin / "python", "-c", "import service; print(service.__file__)"],
        cwd=installed.workdir,
        env=env,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.bin.parent), where.stdout
    head = ScriptDirectory(str(ROOT / "alembic")).get_current_head()
    assert head

    admin = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    fresh = asyncio.run(database.create_database(admin))
    try:
        migrated = _run(
            [installed.bin / "qbo-broker", "migrate"],
            cwd=installed.workdir,
            env={**env, "DATABASE_URL": fresh},
            timeout=60,
        )
        assert f"database at {head}" in migrated.stdout, migrated.stdout + migrated.stderr
        row = asyncio.run(fetchrow(fresh, "SELECT version_num FROM alembic_version"))
        assert row is not None and row["version_num"] == head
        tables = asyncio.run(fetchrow(fresh, "SELECT to_regclass('connections') AS t"))
        assert tables is not None and tables["t"] == "connections"
    finally:
        asyncio.run(database.drop_database(admin, fresh))

    # /readyz compares the database with head_revision(): it must find the packaged scripts too.
    readiness = _run(
        [
            installed.bin / "python",
            "-c",
            "from service.core.db.migrations import head_revision; print(head_revision())",
        ],
        cwd=installed.workdir,
        env=env,
    )
    assert readiness.stdout.strip() == head
    served = _run([installed.bin / "qbo-broker", "serve", "--help"], cwd=installed.workdir, env=env)
    assert "--workers" in served.stdout
    leftovers = {p.name for p in installed.workdir.iterdir()} - {"data"}
    assert not leftovers, f"written to the working directory: {sorted(leftovers)}"
