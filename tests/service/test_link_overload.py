"""Overload on /v1/link: beyond the queue's time bound a request is refused at once
(429 with Retry-After) instead of waiting behind seconds of model work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from service_factories import (
    live_server,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

from service import create_app

BODY = {"mention": "fever", "candidates": [{"id": "F001", "name": "fever"}]}
HELD_S = 0.4  # how long the first model call is held: its measured time is at least this


def test_a_queue_beyond_its_time_bound_answers_429_at_once(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, batch_queue_max_ms=200))
    register_version(reg.factory, reg.store, seed=1)
    app = create_app(reg.settings, enqueue=reg.sent.append)
    with live_server(app) as live, live.client() as c, ThreadPoolExecutor(4) as pool:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        state = app.state.kronlink
        batcher = state.batchers["main"]

        def hold_model_thread() -> threading.Event:
            # returns once the model thread is really held: before that, the
            # hold task itself sits in the work queue and the waits below,
            # which read the queue's size, would pass too early (a race seen
            # on a loaded 2-core CI run, where two requests were then batched)
            gate, started = threading.Event(), threading.Event()

            def hold() -> None:
                started.set()
                gate.wait(30)

            state.executor.submit(hold)
            assert started.wait(10), "the model thread did not pick up the hold"
            return gate

        # 1. one model call that really takes >= HELD_S (the single model thread is busy
        # first): the batcher now expects about HELD_S a query.
        gate = hold_model_thread()
        slow = pool.submit(c.post, "/v1/link", json=BODY)
        wait_until(lambda: state.executor._work_queue.qsize() == 1 and batcher._waiting == 0)
        time.sleep(HELD_S)  # makes the call slow; the waits around it synchronise
        gate.set()
        assert slow.result().status_code == 200
        assert batcher.expected_wait_s(1) >= HELD_S

        # 2. the model thread busy again: one batch taken, one lone request queued (always
        # accepted), then a third would wait ~2 x HELD_S > 200 ms: refused at once.
        gate = hold_model_thread()
        taken = pool.submit(c.post, "/v1/link", json=BODY)
        wait_until(lambda: state.executor._work_queue.qsize() == 1 and batcher._waiting == 0)
        queued = pool.submit(c.post, "/v1/link", json=BODY)
        wait_until(lambda: batcher._waiting == 1)
        t0 = time.perf_counter()
        r = c.post("/v1/link", json=BODY, timeout=5)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 429, r.text
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["type"] == "urn:kronlink:problem:too-many-requests"
        assert "limit 200 ms" in problem["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert elapsed < 1.0  # answered while the model thread is still held
        assert batcher._waiting == 1  # the refused request left nothing queued
        gate.set()
        assert [taken.result().status_code, queued.result().status_code] == [200, 200]
        assert 'kronlink_link_rejected_total{lineage="main"} 1.0' in c.get("/metrics").text
    reg.factory.kw["bind"].dispose()
