"""``kronlink db upgrade|current``: the registry database's migrations."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

ENV_URL = "KRONLINK_DATABASE_URL"
ENV_DATA_DIR = "KRONLINK_DATA_DIR"


def database_url(explicit: str | None) -> str:
    """``--url``, else KRONLINK_DATABASE_URL, else SQLite in KRONLINK_DATA_DIR (./kronlink-data)."""
    from kronlink.registry.db import default_database_url

    if explicit:
        return explicit
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    return default_database_url(Path(os.environ.get(ENV_DATA_DIR, "kronlink-data")))


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run(args: argparse.Namespace) -> int:
    from kronlink.registry.migrate import current_revision, head_revision, upgrade

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    url = database_url(args.url)
    if args.db_command == "upgrade":
        upgrade(url, args.revision)
        print(f"{_redact(url)}: at revision {current_revision(url)}")
    else:
        current = current_revision(url)
        head = head_revision()
        state = "up to date" if current == head else f"behind (head is {head})"
        print(f"{_redact(url)}: at revision {current or 'none (empty)'}, {state}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "db",
        help="migrate the registry database",
        description=f"Database URL: --url, else ${ENV_URL}, else SQLite in ${ENV_DATA_DIR} (default ./kronlink-data).",
    )
    dsub = d.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="apply migrations (creates the schema from empty)")
    up.add_argument("--url", help="database URL (sqlite:///path or postgresql://...)")
    up.add_argument("--revision", default="head", help="target revision (default: %(default)s)")
    cur = dsub.add_parser("current", help="print the database's revision")
    cur.add_argument("--url", help="database URL (sqlite:///path or postgresql://...)")
    d.set_defaults(func=run)
