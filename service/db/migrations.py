"""Running Alembic from the broker: `qbo-broker migrate`, `serve`, tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command


def _ini_path() -> Path:
    # The working directory in a checkout and in the container image (/app) holds alembic.ini;
    # the package's parent does in an editable install.
    for candidate in (Path(os.environ.get("BROKER_ALEMBIC_INI", "alembic.ini")),
                      Path(__file__).resolve().parents[2] / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("alembic.ini not found; run from the project directory or set "
                            "BROKER_ALEMBIC_INI")


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(_ini_path()))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@functools.cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(database_url: str) -> None:
    """Blocking: call from a thread when an event loop is running (env.py runs its own)."""
    command.upgrade(alembic_config(database_url), "head")
