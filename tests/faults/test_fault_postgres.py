"""PostgreSQL (the registry) stopped and started again while an API replica
serves under load and the worker trains: a private cluster (``pg_ctl stop
-m fast``, which cuts every open connection, then ``start``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from fault_clients import LinkLoad
from fault_procs import (
    Child,
    Deployment,
    PgCluster,
    release_gate,
    start_service,
    start_worker,
    wait_gate,
    wait_ready,
    wait_worker_ready,
)
from service_factories import admin, free_port, wait_until
from worker_procs import bootstrap_v1

from kronlink.registry import JobState

PACED = 0.01  # s between requests: steady traffic without starving the worker


def _problem(r: httpx.Response) -> dict:
    assert r.status_code == 503, (r.request.url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith(":unavailable") and r.headers["retry-after"] == "5"
    assert "registry database is unavailable" in body["detail"]
    return body


def test_postgres_restart_while_serving_and_training(
    tmp_path: Path, dep: Deployment, pg_cluster: PgCluster, children: list[Child]
) -> None:
    """While PostgreSQL is down: the replica keeps answering /v1/link from
    its loaded model and a cached ontology (zero failures), registry routes
    are 503 problems (not 500), /readyz stays ready and reports the registry
    down. The job, released from its training pause with the database down,
    retries its commit with backoff and commits on its first attempt once the
    database is back (nothing is retrained). After the restart everything
    recovers through the pool's pre-ping: routes answer again, the job
    succeeds, the new version is served, and every committed row is intact."""
    bootstrap_v1(dep.ctx)  # version 1, task and ontology "alpha", in this process
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start_service(dep, port, tmp_path / "api.log")
    worker = start_worker(dep, tmp_path / "worker.log", gate=True)
    children += [api, worker]
    wait_ready(url, api)
    wait_worker_ready(worker)
    client = httpx.Client(base_url=url, timeout=30)
    by_ontology = {"mention": "fever noted", "ontology": "alpha"}
    assert client.post("/v1/link", json=by_ontology).status_code == 200  # index cached
    before = dep.versions()
    [(v1, _, _, _, _)] = before

    job = dep.submit("beta", 2)
    wait_gate(dep, worker)
    with LinkLoad(url, pause_s=PACED) as load:
        pg_cluster.stop()
        down = time.monotonic()
        _problem(client.get("/v1/versions"))
        _problem(client.get(f"/v1/jobs/{job}", headers=admin()))
        _problem(client.post(f"/v1/versions/{v1}/activate", json={}, headers=admin()))
        # ready: linking works; the registry is reported down apart
        ready = client.get("/readyz")
        checks = ready.json()["checks"]
        assert ready.status_code == 200 and not ready.json()["registry"]["ok"], ready.text
        assert checks["model:main"]["ok"] and checks["model:main"]["version"]["id"] == v1
        r = client.post("/v1/link", json=by_ontology)
        assert r.status_code == 200 and r.json()["model_version"]["id"] == v1, r.text

        release_gate(dep)  # the job trains on, then finds no database to commit to
        wait_until(
            lambda: "commit attempt 2 failed" in worker.log.read_text(errors="replace"),
            120,
            "the worker retrying its commit",
        )
        assert worker.alive(), worker.tail()
        pg_cluster.start()
        up = time.monotonic()
        wait_until(lambda: client.get("/v1/versions").status_code == 200, 15, "routes back")
        routes_back_s = time.monotonic() - up
        done = dep.wait_finished(job, [worker.log, api.log])
        assert (done.state, done.error) == (JobState.SUCCEEDED, None), worker.tail()
        assert done.attempts == 1  # the trained model was committed, not retrained
        wait_ready(url, api, timeout_s=10)
        wait_until(
            lambda: any(a.version_id != v1 and a.sent > up for a in load.answers()),
            10,
            "the new version served",
        )
        outage = up - down
        during = load.between(down, up)

    assert load.failures() == [], load.failures()[:5]
    assert len(during) > 10
    after = dep.versions()
    assert [(i, n, sha, j) for i, n, _, sha, j in after[:1]] == [
        (i, n, sha, j) for i, n, _, sha, j in before
    ]
    assert [(n, st) for _, n, st, _, _ in after] == [(1, "retired"), (2, "active")]
    assert after[1][4] == job
    dep.assert_consistent()
    log = worker.log.read_text(errors="replace")
    print(
        f"\npostgres restart: outage {outage:.1f} s; {len(load.answers())} /v1/link answers "
        f"({len(during)} during the outage), 0 failed; registry routes back "
        f"{routes_back_s:.2f} s after the start; job attempts {done.attempts}; "
        f"progress writes refused {log.count('progress not recorded')}, "
        f"heartbeats failed {log.count('heartbeat failed')}"
    )
