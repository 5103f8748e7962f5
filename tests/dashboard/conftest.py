"""Dashboard fixtures: a migrated SQLite registry with a seeded history."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dashboard_factories import Seeded, seed_history
from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import ArtifactStore, create_engine_from_url, make_session_factory, upgrade


@dataclass
class Registry:
    url: str
    data_dir: Path
    factory: sessionmaker[Session]
    store: ArtifactStore


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "kronlink.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def registry(tmp_path: Path, migrated_template: Path) -> Iterator[Registry]:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "kronlink.db"
    db.write_bytes(migrated_template.read_bytes())
    url = f"sqlite:///{db}"
    engine = create_engine_from_url(url)
    try:
        yield Registry(url, data, make_session_factory(engine), ArtifactStore(data / "artifacts"))
    finally:
        engine.dispose()


@pytest.fixture
def seeded(registry: Registry, tmp_path: Path) -> Seeded:
    return seed_history(registry.factory, registry.store, tmp_path / "scratch")
