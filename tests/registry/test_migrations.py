"""Migrations create the schema from empty, and agree with the models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from kronlink.cli import main
from kronlink.registry import (
    create_engine_from_url,
    current_revision,
    get_ontology,
    head_revision,
    make_session_factory,
    upgrade,
)
from kronlink.registry.migrate import alembic_config
from kronlink.registry.models import Base

TABLES = {
    "alembic_version",
    "audit_log",
    "jobs",
    "lineages",
    "model_versions",
    "ontologies",
    "task_states",
    "tasks",
    "replicas",
}


def test_upgrade_from_empty_then_models_match(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision() == "0004_retriever_states"
    engine = create_engine_from_url(empty_db_url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
    finally:
        engine.dispose()
    upgrade(empty_db_url)  # a second upgrade is a no-op


def test_cli_db_upgrade_and_current(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'cli.db'}"
    assert main(["db", "current", "--url", url]) == 0
    assert "none (empty)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", url]) == 0
    assert "at revision 0004_retriever_states" in capsys.readouterr().out
    assert main(["db", "current", "--url", url]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_reads_url_from_environment(tmp_path, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("KRONLINK_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 0
    assert current_revision(url) == "0004_retriever_states"


def test_upgrade_from_0001_keeps_rows_and_downgrade_reverts(empty_db_url: str) -> None:
    """A registry created before 0002 keeps its ontologies; they just have no file."""
    upgrade(empty_db_url, "0001")
    engine = create_engine_from_url(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO ontologies (name, source, concept_count, created_at) "
                    "VALUES ('icd', 'pkg', 7, CURRENT_TIMESTAMP)"
                )
            )
        upgrade(empty_db_url)
        with make_session_factory(engine).begin() as s:
            onto = get_ontology(s, "icd")
        assert (onto.concept_count, onto.artifact) == (7, None)
        command.downgrade(alembic_config(empty_db_url), "0001")
        cols = {c["name"] for c in inspect(engine).get_columns("ontologies")}
        assert "artifact_uri" not in cols and "concept_count" in cols
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM ontologies")).scalar() == 1
    finally:
        engine.dispose()


def test_sql_ascii_database_is_refused_with_the_fix(pg_server, capsys) -> None:
    """A database created SQL_ASCII (initdb's default under a C locale) made
    the first query die with "cannot use a string pattern on a bytes-like
    object"; it now gets a refusal that says what to create instead."""
    import uuid

    import pytest

    from kronlink.errors import ConfigError

    name = f"kronlink_ascii_{uuid.uuid4().hex[:8]}"
    with pg_server.admin.connect() as conn:
        conn.execute(
            text(
                f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        )
    pg_server.created.append(name)
    url = pg_server.admin.url.set(database=name).render_as_string(hide_password=False)
    with pytest.raises(ConfigError, match=r"SQL_ASCII; kronlink needs UTF8.*createdb -E UTF8"):
        upgrade(url)
    assert main(["db", "upgrade", "--url", url]) != 0
    err = capsys.readouterr().err
    assert "needs UTF8" in err and "Traceback" not in err
