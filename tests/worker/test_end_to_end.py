"""A real Celery worker subprocess: embedded default (SQLite broker) and Redis + PostgreSQL.

Bootstrap version 1, submit a second task, wait for version 2; the planted
mention must be nowhere afterwards: artifacts, database, broker.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from worker_factories import TINY_RANKER, TINY_TRAIN, grep_tree, make_task, unique_plant

from kronlink.cli import main
from kronlink.data.io import save_task
from kronlink.registry import (
    active_version,
    create_engine_from_url,
    get_job,
    list_task_states,
    make_session_factory,
    upgrade,
)
from kronlink.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get(
    "KRONLINK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS = "redis://127.0.0.1:6379"
TIMEOUT_S = 120


def _wait(factory, job_id: int) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with factory.begin() as s:
            job = get_job(s, job_id)
        if job.finished:
            return job.state.value + (f": {job.error}" if job.error else "")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {TIMEOUT_S} s ({job.state.value})")


@pytest.fixture(params=["embedded", "redis_postgresql"])
def backend(request, tmp_path, monkeypatch):
    env = {
        "KRONLINK_DATA_DIR": str(tmp_path / "data"),
        "KRONLINK_QUEUE": f"q{uuid.uuid4().hex[:8]}",
    }
    cleanup = []
    if request.param == "redis_postgresql":
        redis = pytest.importorskip("redis")
        db = random.randint(1, 15)
        client = redis.Redis.from_url(f"{REDIS}/{db}")
        try:
            client.ping()
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text("SELECT 1"))
        except Exception as exc:
            pytest.skip(f"Redis or PostgreSQL unreachable: {exc}")
        name = f"kronlink_worker_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        env["KRONLINK_DATABASE_URL"] = admin.url.set(database=name).render_as_string(
            hide_password=False
        )
        env["KRONLINK_BROKER_URL"] = f"{REDIS}/{db}"

        def drop():
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

        cleanup.append(drop)
        env["_redis_db"] = str(db)
    for k, v in env.items():
        if not k.startswith("_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    upgrade(get_settings().database)
    yield request.param, env
    get_settings.cache_clear()
    for fn in cleanup:
        fn()


def _redis_values(db: int) -> bytes:
    import redis

    client = redis.Redis.from_url(f"{REDIS}/{db}")
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        out.append(key)
        if kind == "string":
            out.append(client.get(key) or b"")
        elif kind == "list":
            out.extend(client.lrange(key, 0, -1))
        elif kind == "hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif kind == "set":
            out.extend(client.smembers(key))
        elif kind == "zset":
            out.extend(client.zrange(key, 0, -1))
    return b"\n".join(out)


def test_real_worker_bootstraps_and_updates(backend, tmp_path, capsys) -> None:
    kind, env = backend
    settings = get_settings()
    plant = unique_plant()
    save_task(make_task("alpha", 1), tmp_path / "alpha")
    save_task(make_task("beta", 2, plant=plant), tmp_path / "beta")
    child_env = {**os.environ, **{k: v for k, v in env.items() if not k.startswith("_")}}
    child_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kronlink.cli import main; sys.exit(main(['worker', '--loglevel', 'WARNING']))",
        ],
        cwd=REPO,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115
    )
    engine = create_engine_from_url(settings.database)
    factory = make_session_factory(engine)
    try:
        common = ["--train", json.dumps(TINY_TRAIN), "--ranker", json.dumps(TINY_RANKER)]
        assert (
            main(
                ["submit", str(tmp_path / "alpha"), "--task", "alpha", "--method", "none", *common]
            )
            == 0
        )
        job1 = int(capsys.readouterr().out.split()[0])
        assert _wait(factory, job1) == "succeeded", (tmp_path / "worker.log").read_text()[-3000:]
        assert (
            main(["submit", str(tmp_path / "beta"), "--task", "beta", "--lambda", "10", *common])
            == 0
        )
        job2 = int(capsys.readouterr().out.split()[0])
        assert _wait(factory, job2) == "succeeded", (tmp_path / "worker.log").read_text()[-3000:]
        with factory.begin() as s:
            v = active_version(s, "main")
            states = list_task_states(s, v.id)
        assert v.number == 2 and len(states) == 2
        assert list(settings.staging_path.iterdir()) == []
        assert grep_tree(Path(settings.artifact_url), plant.encode()) == []
        if kind == "embedded":
            files = list(settings.data_path.glob("*.db*"))
            assert files and all(plant.encode() not in p.read_bytes() for p in files)
        else:
            dump = subprocess.run(
                ["pg_dump", "--data-only", env["KRONLINK_DATABASE_URL"].replace("+psycopg", "")],
                capture_output=True,
                check=False,
            )
            if dump.returncode == 0:
                assert plant.encode() not in dump.stdout
            else:
                with engine.connect() as c:
                    for table in ("jobs", "audit_log", "model_versions", "tasks", "ontologies"):
                        rows = c.execute(text(f"SELECT * FROM {table}")).all()
                        assert plant not in repr(rows)
            assert plant.encode() not in _redis_values(int(env["_redis_db"]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine.dispose()
