"""Worker fixtures: a migrated SQLite registry and settings in tmp_path."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kronlink.registry import ArtifactStore, create_engine_from_url, make_session_factory, upgrade
from kronlink.settings import Settings, get_settings
from worker.job import JobContext


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        lease_s=4.0,
        staged_max_age_s=3600,
        progress_interval_s=0.0,
    )


@pytest.fixture
def ctx(settings: Settings) -> JobContext:
    upgrade(settings.database)
    engine = create_engine_from_url(settings.database)
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    yield JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner="test-worker",
    )
    engine.dispose()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Embedded-default settings in tmp_path, shared with the worker subprocess."""
    values = {
        "KRONLINK_DATA_DIR": str(tmp_path / "data"),
        "KRONLINK_QUEUE": f"q{uuid.uuid4().hex[:8]}",
        # A long lease (no heartbeat during a tiny job) and rare progress writes
        # (phase changes only): on SQLite a progress write that races a
        # heartbeat fails the job with "database is locked" (see
        # test_faults.py::test_progress_write_survives_a_concurrent_heartbeat).
        "KRONLINK_LEASE_S": "600",
        "KRONLINK_PROGRESS_INTERVAL_S": "1000",
        "KRONLINK_RETRY_DELAY_S": "1",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database)
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    engine = create_engine_from_url(settings.database)
    ctx = JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner="test-process",
    )
    yield values, ctx
    engine.dispose()
    get_settings.cache_clear()
