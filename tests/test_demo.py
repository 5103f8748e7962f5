"""``kronlink demo`` end to end, reduced (CNN ranker, 200 queries a task, one epoch):
real task builds, a real ``kronlink up`` (uvicorn and a Celery worker on the
embedded default), both jobs through the HTTP API; then a second run that
must change nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kronlink.registry import (
    create_engine_from_url,
    list_audit,
    list_tasks,
    list_versions,
    make_session_factory,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo(folder: Path, port: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kronlink.cli", "demo", "--dir", str(folder), "--exit"]
    cmd += ["--port", str(port), "--limit", "200", "--ranker", "cnn", "--epochs", "1"]
    cmd += ["--lr", "1e-3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLINK_")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_demo_end_to_end_and_again(tmp_path):
    folder = tmp_path / "demo"
    port = _free_port()
    first = _demo(folder, port)
    assert first.returncode == 0, first.stdout + first.stderr + _log(folder)
    out = first.stdout
    assert "submitting icd10cm through POST /v1/jobs" in out
    assert "submitting hpo through POST /v1/jobs" in out
    assert "predicted forgetting of icd10cm" in out
    assert out.count("model + priors (served)") == 2  # a top-1 table after each job
    assert "predicted forgetting is a relative risk score (uncalibrated: " in out
    assert f"http://127.0.0.1:{port}/dashboard" in out
    assert f"curl -s http://127.0.0.1:{port}/v1/link" in out
    # the example a clinician would check: the lay term to HPO's Hypertension
    assert (
        "/v1/link answers with version 2: 'high blood pressure' -> HP:0000822 'Hypertension'" in out
    )
    # the progress polls stay quiet: no client library line per request
    assert "HTTP Request:" not in out + first.stderr

    engine = create_engine_from_url(f"sqlite:///{folder / 'data' / 'kronlink.db'}")
    try:
        factory = make_session_factory(engine)
        with factory() as s:
            versions = list_versions(s, "main")
            names = {t.id: t.name for t in list_tasks(s)}
            deleted = list_audit(s, action="data_deleted")
        assert [(v.number, v.state.value, v.method, names[v.task_id]) for v in versions] == [
            (1, "retired", "none", "icd10cm"),
            (2, "active", "kfc", "hpo"),
        ]
        assert len(deleted) == 2  # both uploads deleted when their jobs ended
        assert not any((folder / "data" / "staging").iterdir())

        again = _demo(folder, port)  # re-running is safe: nothing new is trained
        assert again.returncode == 0, again.stdout + again.stderr + _log(folder)
        assert again.stdout.count("the active version has learned it already") == 2
        assert "built already" in again.stdout
        with factory() as s:
            assert len(list_versions(s, "main")) == 2
    finally:
        engine.dispose()


def _log(folder: Path) -> str:
    log = folder / "logs" / "up.log"
    return "\n--- up.log (tail) ---\n" + log.read_text()[-4000:] if log.is_file() else ""
