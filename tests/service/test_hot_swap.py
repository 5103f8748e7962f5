"""Hot swap under load: a client sends /v1/link without pause while a real
update job (POST /v1/jobs -> embedded SQLite broker -> a real ``kronlink
worker`` subprocess) activates version 2, and a rollback through the API
follows. Zero failed requests; every answer names a version that was active
during the test (and within the swap bound of its request); each new version
is served within 2 s of its activation. And a version whose artifact is
corrupt is reported while the old one keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service_factories import (
    admin,
    jsonl,
    live_server,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

from kronlink.contract import UpdateJobSpec
from kronlink.data.io import concept_to_dict, query_to_dict, save_task
from kronlink.registry import (
    activate_version,
    create_job,
    get_job,
    get_version,
    lineage_transaction,
)
from kronlink.settings import Settings
from service import create_app
from worker.job import JobContext, Outcome, run_job

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "worker") not in sys.path:  # the worker tests' tiny settings
    sys.path.append(str(REPO / "tests" / "worker"))
from worker_factories import TINY_RANKER, TINY_TRAIN  # noqa: E402

SWAP_BOUND_S = 2.0
CANDS = [{"id": "fever", "name": "fever"}, {"id": "asthma", "name": "asthma"}]


def _task(name: str, seed: int):
    import random

    from kronlink.data.schema import Candidate, Concept, Query, Task

    names = ["fever", "cough", "asthma", "angina", "anemia", "gout", "rash", "migraine"]
    rng = random.Random(seed)
    queries = []
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        for _ in range(n):
            picked = rng.sample(names, 4)
            gold = rng.choice(picked)
            cands = tuple(Candidate(c, c) for c in picked)
            queries.append(Query(f"{gold} noted", gold, "pt has", "today", cands, split))
    return Task(name, tuple(Concept(n, n) for n in names), tuple(queries))


class Load:
    """One client sending /v1/link back to back; records every answer."""

    def __init__(self, client) -> None:
        self.client = client
        self.stop = threading.Event()
        self.log: list[tuple[datetime, datetime, int, int | None]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"mention": "fever noted", "left_context": "pt has", "candidates": CANDS}
        while not self.stop.is_set():
            sent = datetime.now(UTC)
            try:
                r = self.client.post("/v1/link", json=body)
                vid = r.json()["model_version"]["id"] if r.status_code == 200 else None
                status = r.status_code
            except Exception:
                status, vid = -1, None
            self.log.append((sent, datetime.now(UTC), status, vid))

    def first_answer_by(self, version_id: int, after: datetime) -> datetime | None:
        for _, received, _, vid in self.log:
            if received >= after and vid == version_id:
                return received
        return None

    def answers_by(self, version_id: int, after: datetime) -> int:
        return sum(1 for _, received, _, vid in self.log if received >= after and vid == version_id)


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "KRONLINK_DATA_DIR": str(settings.data_dir),
        "KRONLINK_QUEUE": settings.queue,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from kronlink.cli import main; "
                "sys.exit(main(['worker', '--loglevel', 'WARNING']))",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_swap_under_load_through_a_real_job_then_rollback(tmp_path) -> None:
    settings = service_settings(tmp_path, queue=f"q{uuid.uuid4().hex[:8]}")
    reg = make_registry(settings)
    worker = _start_worker(settings, tmp_path / "worker.log")  # starts while v1 is made
    try:
        # version 1: the real job body, in this process
        ctx = JobContext(settings, reg.factory, reg.store, owner="test-bootstrap")
        staged = uuid.uuid4().hex
        save_task(_task("alpha", 1), settings.staging_path / staged)
        spec = UpdateJobSpec(
            task_name="alpha", staged_id=staged, method="none", train=TINY_TRAIN, ranker=TINY_RANKER
        )
        with reg.factory.begin() as s:
            job, _ = create_job(s, lineage="main", payload=spec.model_dump(mode="json"))
        assert run_job(ctx, job.id) == Outcome.SUCCEEDED

        app = create_app(settings)  # the real producer: the embedded SQLite broker
        with live_server(app) as live, live.client() as c, live.client() as load_client:
            wait_until(lambda: c.get("/readyz").status_code == 200)
            v1 = c.get("/v1/versions").json()[0]
            load = Load(load_client)
            started = datetime.now(UTC)
            load.thread.start()

            beta = _task("beta", 2)
            files = {
                "queries": ("q.jsonl", jsonl([query_to_dict(q) for q in beta.queries])),
                "ontology": ("o.jsonl", jsonl([concept_to_dict(x) for x in beta.concepts])),
            }
            form = {
                "task": "beta",
                "method": "kfc",
                "lambda": "10",
                "train": json.dumps(TINY_TRAIN),
            }
            r = c.post("/v1/jobs", data=form, files=files, headers=admin())
            assert r.status_code == 202, r.text
            job2 = r.json()["id"]

            def finished():
                with reg.factory.begin() as s:
                    j = get_job(s, job2)
                return j if j.finished else None

            j = wait_until(finished, timeout_s=120, interval_s=0.2)
            assert j.state.value == "succeeded", (
                j.error,
                (tmp_path / "worker.log").read_text()[-2000:],
            )
            v2 = c.get(f"/v1/jobs/{job2}", headers=admin()).json()["version_id"]
            with reg.factory.begin() as s:
                promoted_at = get_version(s, v2).activated_at
            # v2 answers a run of requests before the rollback (a count, not a sleep)
            wait_until(lambda: load.answers_by(v2, promoted_at) >= 10, timeout_s=10)

            r = c.post(
                f"/v1/versions/{v1['id']}/activate",
                json={"reason": "rollback test"},
                headers=admin(),
            )
            assert r.status_code == 200
            with reg.factory.begin() as s:
                rolled_at = get_version(s, v1["id"]).activated_at
            wait_until(lambda: load.answers_by(v1["id"], rolled_at) >= 10, timeout_s=10)
            load.stop.set()
            load.thread.join(10)
            ended = datetime.now(UTC)

        statuses = [status for _, _, status, _ in load.log]
        assert len(statuses) > 50 and set(statuses) == {200}, sorted(set(statuses))
        # active intervals from the registry's activation times
        intervals = {
            v1["id"]: [(started - timedelta(days=1), promoted_at), (rolled_at, ended)],
            v2: [(promoted_at, rolled_at)],
        }
        bound = timedelta(seconds=SWAP_BOUND_S)
        for sent, received, _, vid in load.log:
            assert vid in intervals, vid
            assert any(a <= received and sent - bound <= b for a, b in intervals[vid]), (
                sent,
                received,
                vid,
            )
        assert load.first_answer_by(v2, promoted_at) - promoted_at <= bound
        assert load.first_answer_by(v1["id"], rolled_at) - rolled_at <= bound
        # once the replica answers with the new version it never goes back to the old
        first_v2 = load.first_answer_by(v2, promoted_at)
        after_swap = [vid for sent, _, _, vid in load.log if first_v2 < sent and sent < rolled_at]
        assert after_swap and set(after_swap) == {v2}
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        reg.factory.kw["bind"].dispose()


def test_a_corrupt_version_is_reported_and_the_old_one_keeps_serving(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, model_retry_s=0.5))
    v1 = register_version(reg.factory, reg.store, seed=1)
    app = create_app(reg.settings, enqueue=reg.sent.append)
    with live_server(app) as live, live.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        v2 = register_version(reg.factory, reg.store, seed=2, task="beta", activate=False)
        folder = Path(reg.store.get(reg.store.key_of(v2.artifact.uri), v2.artifact.sha256))
        weights = folder / "model.safetensors"
        weights.chmod(0o644)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit: the checksum no longer matches
        weights.write_bytes(bytes(data))

        r = c.post(f"/v1/versions/{v2.id}/activate", headers=admin())
        assert r.status_code == 409 and "model.safetensors" in r.json()["detail"]
        # activated anyway, past the API (the CLI, a script on the database)
        with lineage_transaction(reg.factory, "main") as s:
            activate_version(s, v2.id, actor="test", reason="past the API")

        def reported():
            check = c.get("/readyz").json()["checks"]["model:main"]
            return check if check["load_error"] else None

        check = wait_until(reported, timeout_s=3)
        assert check["ok"] and check["version"]["id"] == v1.id
        assert (
            "checksum mismatch" in check["load_error"]
            and f"version {v2.number}" in check["load_error"]
        )
        assert "still serving" in check["detail"]
        body = {"mention": "x", "candidates": CANDS}

        def load_failures() -> float:
            return next(
                float(line.split()[-1])
                for line in c.get("/metrics").text.splitlines()
                if line.startswith('kronlink_model_load_failures_total{lineage="main"}')
            )

        # retried every model_retry_s, failing each time; v1 answers meanwhile
        seen = load_failures()
        deadline = time.monotonic() + 30
        while load_failures() < seen + 2:
            assert time.monotonic() < deadline, "the failed version was not retried"
            r = c.post("/v1/link", json=body)
            assert r.status_code == 200 and r.json()["model_version"]["id"] == v1.id
        assert seen >= 1
        # rolling back clears the report
        assert c.post(f"/v1/versions/{v1.id}/activate", headers=admin()).status_code == 200
        wait_until(
            lambda: c.get("/readyz").json()["checks"]["model:main"]["load_error"] is None,
            timeout_s=3,
        )
    reg.factory.kw["bind"].dispose()
