"""Migrations create the schema from empty, and agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from kronlink.cli import main
from kronlink.registry import create_engine_from_url, current_revision, head_revision, upgrade
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
}


def test_upgrade_from_empty_then_models_match(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision() == "0001"
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
    assert "at revision 0001" in capsys.readouterr().out
    assert main(["db", "current", "--url", url]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_reads_url_from_environment(tmp_path, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("KRONLINK_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 0
    assert current_revision(url) == "0001"
