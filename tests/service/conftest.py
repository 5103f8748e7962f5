"""Service fixtures: a migrated registry (SQLite, or a fresh PostgreSQL
database), settings in tmp_path, and the app served by a real uvicorn on a
free port, talked to over HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_factories import (
    LiveServer,
    Registry,
    live_server,
    make_registry,
    private_pg_database,
    service_settings,
)
from sqlalchemy import create_engine, text

from service import create_app

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One fresh PostgreSQL database for the session, dropped at the end."""
    with private_pg_database("kronlink_service") as url:
        yield url


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
