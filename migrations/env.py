"""Alembic environment for kronlink's registry.

The URL comes, in this order, from ``config.attributes["kronlink_url"]``
(``kronlink db upgrade``), ``alembic -x url=...``, or KRONLINK_DATABASE_URL.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from kronlink.registry.db import create_engine_from_url
from kronlink.registry.models import Base

config = context.config
if config.config_file_name is not None and not config.attributes.get("kronlink_url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = (
        config.attributes.get("kronlink_url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("KRONLINK_DATABASE_URL")
    )
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set KRONLINK_DATABASE_URL")
    return url


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine_from_url(_url())
    try:
        with engine.connect() as conn:
            _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
