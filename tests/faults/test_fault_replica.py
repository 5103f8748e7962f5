"""An API replica restarted mid-load: two ``kronlink serve`` processes on one
registry, one client thread sending /v1/link to both in turn without pause
(after a refused connection, 50 ms); one replica is
stopped gracefully (SIGTERM) and restarted, then killed (SIGKILL) and
restarted, while the other serves on."""

from __future__ import annotations

import itertools
import signal
import socket
import time
from pathlib import Path

import httpx
from fault_clients import LinkLoad, SlowRequest
from fault_procs import (
    Child,
    Deployment,
    start_service,
    wait_ready,
)
from service_factories import admin, free_port, register_version, wait_until


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_replica_restarted_mid_load(tmp_path: Path, dep: Deployment, children: list[Child]) -> None:
    """Replica a answers every request throughout (zero failures). Replica b,
    on SIGTERM, finishes the request in flight (uvicorn's graceful shutdown)
    and exits (by re-raising SIGTERM, as uvicorn does); on SIGKILL it just dies. Its client sees refused connections
    only while it is down, never an error status. Restarted, b is ready
    within seconds and serves the active version, including one activated
    while it was down."""
    v1 = register_version(dep.ctx.factory, dep.ctx.store, seed=1)
    v2 = register_version(dep.ctx.factory, dep.ctx.store, seed=2, task="beta", activate=False)
    ports = [free_port(), free_port()]
    url_a, url_b = (f"http://127.0.0.1:{p}" for p in ports)
    a = start_service(dep, ports[0], tmp_path / "a.log")
    b = start_service(dep, ports[1], tmp_path / "b.log")
    children += [a, b]
    wait_ready(url_a, a)
    wait_ready(url_b, b)
    downtime: dict[str, float] = {}
    windows: list[tuple[float, float]] = []  # b down, from the signal until ready again

    def restart_b(name: str, down: float) -> Child:
        child = start_service(dep, ports[1], tmp_path / f"b-{name}.log")
        children.append(child)
        wait_ready(url_b, child)
        downtime[name] = time.monotonic() - down
        windows.append((down, time.monotonic()))
        return child

    with LinkLoad(url_a, url_b) as load:
        wait_until(lambda: min(len(load.answers(u)) for u in (url_a, url_b)) >= 20, 30, "load")
        in_flight = SlowRequest(url_b)
        wait_until(in_flight.in_flight, 10, "the server holds the slow request")
        b.signal(signal.SIGTERM)
        down = time.monotonic()
        # b stops listening at once, and stays up while the request is in flight
        wait_until(lambda: not _listening(ports[1]), 10, "b closed its listening socket")
        assert b.alive(), "b exited with a request in flight"
        status, body = in_flight.finish()
        assert status == 200 and body["model_version"]["id"] == v1.id, body
        # uvicorn re-raises the signal once its shutdown is done: -SIGTERM, not a crash
        assert b.proc.wait(timeout=15) in (0, -signal.SIGTERM), b.tail()
        b2 = restart_b("sigterm", down)

        b2.signal(signal.SIGKILL)
        down = time.monotonic()
        assert b2.proc.wait(timeout=10) == -signal.SIGKILL
        r = httpx.post(
            f"{url_a}/v1/versions/{v2.id}/activate", json={"reason": "b is down"}, headers=admin()
        )
        assert r.status_code == 200, r.text
        activated = time.monotonic()
        b3 = restart_b("sigkill", down)
        ready = httpx.get(f"{url_b}/readyz").json()
        assert ready["checks"]["model:main"]["version"]["id"] == v2.id, ready
        wait_until(
            lambda: load.serves(url_b, v2.id, activated),
            5,
            "b serves the version activated while it was down",
        )
        wait_until(
            lambda: sum(1 for x in load.answers(url_b) if x.sent > activated) >= 10, 10, "b serves"
        )

    assert b3.alive()
    assert load.failures(url_a) == [], load.failures(url_a)[:5]
    assert len(load.answers(url_a)) > 100
    for start, end in windows:  # a kept answering while b was away
        assert len(load.between(start, end, url_a)) >= end - start, (start, end)
    sent_a = [x.sent for x in load.answers(url_a)]
    gap_a = max(later - earlier for earlier, later in itertools.pairwise(sent_a))
    assert gap_a < 2.0, f"a stalled {gap_a:.2f} s"
    refused = load.failures(url_b)
    assert {f.status for f in refused} <= {-1}, [f for f in refused if f.status != -1][:5]
    assert {f.error for f in refused} <= {"ConnectError", "RemoteProtocolError", "ReadError"}
    served_b = [x for x in load.answers(url_b) if x.status == 200]
    assert {x.version_id for x in served_b if x.sent > activated} == {v2.id}
    print(
        f"\nreplica restart: a served {len(load.answers(url_a))} (0 failed); b served "
        f"{len(served_b)}, refused {len(refused)} while down (a answered "
        f"{sum(len(load.between(s, e, url_a)) for s, e in windows)} meanwhile, longest gap "
        f"{gap_a:.2f} s); b ready again "
        f"{downtime['sigterm']:.1f} s after SIGTERM and {downtime['sigkill']:.1f} s after "
        "SIGKILL; the in-flight request at SIGTERM completed with 200"
    )
