"""Service fixtures: a migrated registry (SQLite, or a fresh PostgreSQL
database), settings in tmp_path, and the app served by a real uvicorn on a
free port, talked to over HTTP."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_factories import LiveServer, Registry, live_server, make_registry, service_settings
from sqlalchemy import create_engine, text

from kronlink.registry import upgrade
from service import create_app

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get(
    "KRONLINK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One fresh PostgreSQL database for the session, dropped at the end."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        msg = f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({type(exc).__name__}: {exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it", pytrace=False)
        pytest.skip(msg)
    name = f"kronlink_service_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


TABLES = "audit_log, task_states, model_versions, jobs, tasks, ontologies, lineages"


@pytest.fixture(params=["sqlite"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    overrides = {}
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        engine.dispose()
        overrides["database_url"] = url
    reg = make_registry(service_settings(tmp_path, **overrides))
    yield reg
    reg.factory.kw["bind"].dispose()


@pytest.fixture
def server(registry: Registry) -> Iterator[LiveServer]:
    app = create_app(registry.settings, enqueue=registry.sent.append)
    with live_server(app) as live:
        yield live
