"""Fault fixtures: a private PostgreSQL cluster for the session (a fresh
database per test), a private redis-server per test, and the subprocesses a
test starts, stopped when it ends. The shared servers on 5432 and 6379 are
never used here: these tests stop and restart their servers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_procs import (
    Child,
    Deployment,
    Mounts,
    PgCluster,
    RedisServer,
    make_deployment,
    unavailable,
)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    try:
        return pg_cluster.create_database()
    except Exception:  # a test that failed with the cluster stopped
        pg_cluster.start()
        return pg_cluster.create_database()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server", "not on PATH")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dep(tmp_path: Path, pg_url: str, redis_server: RedisServer) -> Iterator[Deployment]:
    d = make_deployment(tmp_path, pg_url, redis_server.url)
    yield d
    d.close()


@pytest.fixture
def children(dep: Deployment) -> Iterator[list[Child]]:
    """Subprocesses to stop at the end, in reverse order of start (before the
    servers and the deployment they use)."""
    started: list[Child] = []
    yield started
    for child in reversed(started):
        child.stop(grace_s=10)


@pytest.fixture
def mounts(tmp_path: Path, children: list[Child]) -> Iterator[Mounts]:
    """Mounts made by the test, undone once its processes have stopped."""
    m = Mounts()
    m.check_permitted(tmp_path / "mount-probe")
    yield m
    for child in reversed(children):
        child.stop(grace_s=10)
    m.undo()
