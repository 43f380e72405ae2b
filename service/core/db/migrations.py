"""Running Alembic from the broker: `qbo-broker migrate`, `serve`, tests.

Alembic is configured here, not from alembic.ini, so an installed broker migrates from any
working directory; alembic.ini is only for developers running the `alembic` command by hand.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command


@functools.cache
def script_location() -> Path:
    """The migration scripts: inside the package when installed from the wheel, which carries the
    top-level alembic/ folder as service/migrations (pyproject.toml); in a checkout (uv run, an
    editable install), that alembic/ folder itself, next to the package."""
    package = Path(str(files("service")))
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Alembic migrations in {package / 'migrations'} (installed) or "
        f"{package.parent / 'alembic'} (checkout)"
    )


def alembic_config(database_url: str | None = None) -> Config:
    # Options go through ConfigParser interpolation: a literal % (in an escaped password, say)
    # must be doubled.
    config = Config()
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@functools.cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(database_url: str) -> None:
    """Blocking: call from a thread when an event loop is running (env.py runs its own)."""
    command.upgrade(alembic_config(database_url), "head")
