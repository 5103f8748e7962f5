"""Worker fixtures: a migrated SQLite registry and settings in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronlink.registry import ArtifactStore, create_engine_from_url, make_session_factory, upgrade
from kronlink.settings import Settings
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
