"""Redis (broker, results, activation notices) stopped and restarted, for real:
a private redis-server without persistence, so a restart loses every queued
message. The registry is a private PostgreSQL cluster; the worker and the
API replicas are real subprocesses."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from fault_clients import LinkLoad, job_files
from fault_procs import (
    Child,
    Deployment,
    RedisServer,
    release_gate,
    start_service,
    start_worker,
    wait_gate,
    wait_ready,
    wait_worker_ready,
)
from service_factories import admin, free_port, register_version, wait_until

from kronlink.registry import JobState, list_jobs

CHANNEL = "kronlink:activations"
PACED = 0.01  # s between requests: steady traffic without starving the worker


def test_redis_restart_while_the_worker_trains(
    tmp_path: Path, dep: Deployment, redis_server: RedisServer, children: list[Child]
) -> None:
    """Redis goes down while the worker trains job a and stays down through
    a's commit; it comes back empty, so job b's queued message is gone. Job
    a still succeeds (the registry, not Redis, holds its outcome), and the
    worker, on reconnecting, re-sends every queued job: b runs and succeeds."""
    worker = start_worker(dep, tmp_path / "worker.log", gate=True)
    children.append(worker)
    wait_worker_ready(worker)
    a = dep.submit("alpha", 1)
    wait_gate(dep, worker)  # a is training
    b = dep.submit("beta", 2)  # waits in the broker behind the busy solo worker
    assert dep.job(a).state == JobState.RUNNING and dep.job(a).phase == "train"
    assert dep.job(b).state == JobState.QUEUED
    assert redis_server.client().llen(dep.settings.queue) == 1

    redis_server.stop()
    release_gate(dep)
    ja = dep.wait_finished(a, [worker.log])  # committed with Redis still down
    assert (ja.state, ja.attempts, ja.error) == (JobState.SUCCEEDED, 1, None)
    time.sleep(1.0)
    redis_server.start()
    up = time.monotonic()
    assert redis_server.client().llen(dep.settings.queue) == 0  # b's message is lost

    jb = dep.wait_finished(b, [worker.log], timeout_s=45)
    recovered_s = time.monotonic() - up
    assert (jb.state, jb.attempts, jb.error) == (JobState.SUCCEEDED, 1, None), worker.tail()
    assert "reconnect sweep" in worker.tail(20000)
    assert worker.alive(), worker.tail()
    versions = dep.versions()
    assert [(n, st, j) for _, n, st, _, j in versions] == [(1, "retired", a), (2, "active", b)]
    dep.assert_consistent()
    print(f"\nredis restart during a job: b recovered {recovered_s:.1f} s after Redis came back")


def _subscribers(redis_server: RedisServer) -> int:
    return dict(redis_server.client().pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0)


def test_redis_restart_while_serving(
    tmp_path: Path, dep: Deployment, redis_server: RedisServer, children: list[Child]
) -> None:
    """Two replicas under load, one worker. With Redis down: /v1/link answers
    on both (zero failures), /readyz stays 200 (Redis is not a readiness
    check: docs/service.md), POST /v1/jobs is a 503 naming the stored queued
    job whose dataset stays staged for it (the same submission later gives
    that job: no second row, the second copy removed at once), an
    activation succeeds and its replica swaps. Once Redis is back: the other
    replica, which missed the notice, catches up on resubscribing; notices
    swap replicas again (the poll is 30 s here, so only a notice can do it
    within 5 s); the worker re-sends the queued job, which succeeds."""
    v1 = register_version(dep.ctx.factory, dep.ctx.store, seed=1)
    v2 = register_version(dep.ctx.factory, dep.ctx.store, seed=2, task="beta", activate=False)
    dep.env["KRONLINK_MODEL_POLL_S"] = "30"
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    for i, url in enumerate(urls):
        children.append(start_service(dep, int(url.rsplit(":", 1)[1]), tmp_path / f"api{i}.log"))
    worker = start_worker(dep, tmp_path / "worker.log")
    children.append(worker)
    for url, child in zip(urls, children[:2], strict=True):
        wait_ready(url, child)
    wait_worker_ready(worker)
    wait_until(lambda: _subscribers(redis_server) == 2, 20, "both replicas subscribed")
    api_a = httpx.Client(base_url=urls[0], timeout=30)

    def activate(version_id: int, reason: str) -> float:
        r = api_a.post(
            f"/v1/versions/{version_id}/activate", json={"reason": reason}, headers=admin()
        )
        assert r.status_code == 200, r.text
        return time.monotonic()

    url_a, url_b = urls
    with LinkLoad(url_a, url_b, pause_s=PACED) as load:
        t = activate(v2.id, "before the outage")
        wait_until(lambda: load.serves(url_b, v2.id, t), 5, "replica b swapped by notice")
        swap_before_s = time.monotonic() - t

        redis_server.stop()
        down = time.monotonic()
        ready = api_a.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"], ready.text
        files = job_files(tmp_path, "gamma", 3)
        form = {"task": "gamma", "method": "none", "epochs": "1", "batch_size": "16"}
        t0 = time.monotonic()
        r = api_a.post("/v1/jobs", data=form, files=files, headers=admin())
        refuse_s = time.monotonic() - t0
        assert r.status_code == 503, r.text
        problem = r.json()
        assert r.headers["content-type"].startswith("application/problem+json")
        assert problem["type"].endswith(":unavailable") and r.headers["retry-after"] == "5"
        assert "is queued but the broker refused its message" in problem["detail"]
        with dep.ctx.factory.begin() as s:
            [job] = list_jobs(s)
        assert f"job {job.id} " in problem["detail"] and job.state == JobState.QUEUED
        assert dep.staged() == [job.payload["staged_id"]]  # kept for the re-send
        t = activate(v1.id, "during the outage")  # the notice is lost
        wait_until(lambda: load.serves(url_a, v1.id, t), 3, "replica a swapped itself")
        time.sleep(1.0)
        redis_server.start()
        up = time.monotonic()
        outage = up - down
        wait_until(lambda: _subscribers(redis_server) == 2, 70, "both replicas subscribed again")
        resubscribed_s = time.monotonic() - up
        wait_until(lambda: load.serves(url_b, v1.id, t), 5, "replica b caught up on resubscribing")
        caught_up_s = time.monotonic() - up

        done = dep.wait_finished(job.id, [worker.log])  # re-sent by the reconnected worker
        assert (done.state, done.attempts, done.error) == (JobState.SUCCEEDED, 1, None)
        again = api_a.post("/v1/jobs", data=form, files=files, headers=admin())
        assert again.status_code == 200 and again.json()["id"] == job.id, again.text
        with dep.ctx.factory.begin() as s:
            assert [j.id for j in list_jobs(s)] == [job.id]  # the same job, no second row
        t = activate(v2.id, "after the outage")
        wait_until(lambda: load.serves(url_b, v2.id, t), 5, "replica b swapped by notice again")
        swap_after_s = time.monotonic() - t
        during_a, during_b = load.between(down, up, url_a), load.between(down, up, url_b)

    for url in urls:
        assert load.failures(url) == [], load.failures(url)[:5]
    assert len(during_a) > 10 and len(during_b) > 10
    dep.assert_consistent()
    print(
        f"\nredis restart while serving: outage {outage:.1f} s; answers a={len(load.answers(url_a))} "
        f"b={len(load.answers(url_b))} (during the outage {len(during_a)}/{len(during_b)}), 0 failed; "
        f"503 for POST /v1/jobs in {refuse_s:.2f} s; notice swap {swap_before_s:.2f} s before, "
        f"{swap_after_s:.2f} s after; resubscribed {resubscribed_s:.1f} s and caught up "
        f"{caught_up_s:.1f} s after Redis came back"
    )
