"""``kronlink serve --workers 2``: two real server processes; /metrics counts every
request whichever process answered it, and whichever process answers the scrape
(Prometheus multiprocess mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from service_factories import (
    ADMIN,
    free_port,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
BODY = {"mention": "fever", "candidates": [{"id": "F001", "name": "fever"}]}
REQUESTS = 40


def _link_count(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("kronlink_http_requests_total{") and 'route="/v1/link"' in line:
            total += float(line.split()[-1])
    return total


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_two_server_processes_report_one_sum_of_metrics(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path))
    register_version(reg.factory, reg.store, seed=1)
    reg.factory.kw["bind"].dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLINK_")} | {
        "KRONLINK_DATA_DIR": str(tmp_path / "data"),
        "KRONLINK_ADMIN_TOKEN": ADMIN,
        "KRONLINK_TORCH_THREADS": "1",
        "KRONLINK_REPLICA_REPORT_S": "0",
        "PYTHONPATH": str(REPO),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kronlink.cli", "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_until(ready, timeout_s=90, interval_s=0.3)
        assert proc.poll() is None, log.read_text()
        for _ in range(REQUESTS):
            # a new connection each time, so the kernel spreads them over both processes
            with httpx.Client(base_url=url, timeout=30) as c:
                assert c.post("/v1/link", json=BODY).status_code == 200
        counts, queries = [], []
        for _ in range(6):  # scrapes land on either process: each sees the sum
            with httpx.Client(base_url=url, timeout=30) as c:
                text = c.get("/metrics").text
            counts.append(_link_count(text))
            queries.append(_value(text, 'kronlink_link_batch_size_sum{lineage="main"}'))
        assert counts == [float(REQUESTS)] * 6, counts
        assert queries == [float(REQUESTS)] * 6, queries
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
