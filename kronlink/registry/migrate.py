"""Running the Alembic migrations in ``migrations/`` from code (``kronlink db``)."""

from __future__ import annotations

from pathlib import Path

from kronlink.errors import ConfigError

__all__ = ["alembic_config", "current_revision", "head_revision", "migrations_dir", "upgrade"]


def migrations_dir() -> Path:
    """The repository's ``migrations/`` folder (beside the ``kronlink`` package)."""
    path = Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise ConfigError(
            f"migrations folder not found at {path}: install kronlink from its repository "
            "(pip install -e .) to run migrations"
        )
    return path


def alembic_config(url: str):  # -> alembic.config.Config (imported lazily)
    """An Alembic config for ``url`` that needs no alembic.ini."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["kronlink_url"] = url  # read by migrations/env.py; no % escaping needed
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating it from empty)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at, None when unmigrated."""
    from alembic.runtime.migration import MigrationContext

    from kronlink.registry.db import create_engine_from_url

    engine = create_engine_from_url(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision in ``migrations/``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
