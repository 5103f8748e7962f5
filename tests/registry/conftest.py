"""Registry fixtures: every database test runs on SQLite and on the real PostgreSQL.

PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth): one fresh, uniquely
named database per test session is created from ``test`` and dropped at the
end; each test starts from empty tables. Unreachable PostgreSQL fails the run
when CI=true and skips with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import create_engine_from_url, make_session_factory, upgrade

PG_ADMIN_URL = os.environ.get(
    "KRONLINK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class PgServer:
    """Creates and drops uniquely named databases on the test server."""

    def __init__(self, admin_url: str) -> None:
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def create(self) -> str:
        name = f"kronlink_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer(PG_ADMIN_URL)
    try:
        with server.admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        msg = f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({type(exc).__name__}: {exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it", pytrace=False)
        pytest.skip(msg)
    try:
        yield server
    finally:
        server.drop_all()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A URL of an empty database (no schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_server").create()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("template") / "kronlink.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


@pytest.fixture(scope="session")
def pg_migrated_url(pg_server: PgServer) -> str:
    url = pg_server.create()
    upgrade(url)
    return url


TABLES = "audit_log, task_states, model_versions, jobs, tasks, ontologies, lineages"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A migrated database with empty tables."""
    if request.param == "sqlite":
        path = tmp_path / "kronlink.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_migrated_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_engine_from_url(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as s:
        yield s
