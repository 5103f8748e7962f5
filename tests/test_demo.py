"""``kronlink demo`` end to end, reduced (CNN ranker, 200 queries a task, one epoch):
real task builds, a real ``kronlink up`` (uvicorn and a Celery worker on the
embedded default), both jobs through the HTTP API; the clinical list
(tests/clinical_mentions.py) through HTTP on the version it serves; then a
second run that must change nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from clinical_mentions import LISTS, accepted

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

        right = _clinical_list_through_http(folder)
        # The bars of issue 12 (80% of 27 is 22) on this reduced demo, whose
        # one-epoch CNN has learned next to nothing: what it gets right comes
        # from exact names, ICD-10-CM's conventions and the retriever's
        # acronyms and loose keys ("COPD", "kidney stones"), ranked first under
        # the exact-name prior. The full demo measured 22 and 25
        # (results/clinical/demo_http_session5.json).
        assert right["icd10cm"] >= 22 and right["hpo"] >= 22, right

        again = _demo(folder, port)  # re-running is safe: nothing new is trained
        assert again.returncode == 0, again.stdout + again.stderr + _log(folder)
        assert again.stdout.count("the active version has learned it already") == 2
        assert "built already" in again.stdout
        with factory() as s:
            assert len(list_versions(s, "main")) == 2
    finally:
        engine.dispose()


def _clinical_list_through_http(folder: Path) -> dict[str, int]:
    """``kronlink serve`` on the demo's data: per ontology, the list's
    mentions whose first answer through /v1/link is an accepted code."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLINK_")}
    env.update(KRONLINK_DATA_DIR=str(folder / "data"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "kronlink.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    right: dict[str, int] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "kronlink serve never became ready"
                time.sleep(0.5)
            for onto, items in LISTS.items():
                right[onto] = 0
                for mention, codes in items.items():
                    r = client.post("/v1/link", json={"mention": mention, "ontology": onto})
                    assert r.status_code == 200, r.text
                    results = r.json()["results"]
                    right[onto] += bool(results) and accepted(results[0]["id"], codes)
    finally:
        proc.terminate()
        proc.wait(60)
    return right


def _log(folder: Path) -> str:
    log = folder / "logs" / "up.log"
    return "\n--- up.log (tail) ---\n" + log.read_text()[-4000:] if log.is_file() else ""
