"""Activation under hostile conditions, over real HTTP, on SQLite and PostgreSQL.

- 24 activate calls (promotions and rollbacks) for six versions, fired at
  once from threads: afterwards exactly one version is active, it is the one
  the last committed activation in the audit log names, every answer is a
  200 or a 4xx, the audit log replays as a serial history, and the model the
  replica serves is the registry's active version.
- A version whose stored files no longer match their sha256 is refused
  (409 corrupt-artifact, naming the file) and changes nothing: the registry,
  the audit log and the served model stay as they were.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_helpers import problem, snapshot
from service_factories import admin, register_version, wait_until

from kronlink.registry import AuditAction, VersionState, list_audit, list_versions

N_VERSIONS = 6
N_CALLS = 24
CANDS = [{"id": "a", "name": "fever"}, {"id": "b", "name": "asthma"}]
ACTIVATIONS = {AuditAction.PROMOTED.value, AuditAction.ROLLED_BACK.value}


def _served(c: httpx.Client) -> int:
    r = c.post("/v1/link", json={"mention": "x", "candidates": CANDS})
    assert r.status_code == 200, r.text
    return r.json()["model_version"]["id"]


@pytest.mark.parametrize("registry", ["sqlite", "postgresql"], indirect=True)
def test_concurrent_activations_leave_one_served_active_version(registry, server) -> None:
    f, store = registry.factory, registry.store
    # 1-3 retired, 4 active, 5 and 6 candidates: the race mixes promotions and rollbacks
    versions = [
        register_version(f, store, seed=i, task=f"t{i}", activate=i < 4) for i in range(N_VERSIONS)
    ]
    with f.begin() as s:
        start_audit = max(a.id for a in list_audit(s))
    targets = [versions[i % N_VERSIONS].id for i in range(N_CALLS)]
    random.Random(8).shuffle(targets)
    results: list[tuple[int, dict[str, Any], float] | None] = [None] * N_CALLS
    barrier = threading.Barrier(N_CALLS)

    def call(i: int) -> None:
        with server.client() as c:
            barrier.wait()
            t0 = time.monotonic()
            r = c.post(
                f"/v1/versions/{targets[i]}/activate",
                json={"reason": f"race {i}"},
                headers=admin(),
            )
            results[i] = (r.status_code, r.json(), time.monotonic() - t0)

    with server.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(N_CALLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results), "a call never answered"
    statuses = sorted({r[0] for r in results})  # type: ignore[index]
    assert set(statuses) <= {200, 409}, [r for r in results if r and r[0] not in (200, 409)]
    for i, (status, body, _) in enumerate(results):  # type: ignore[misc]
        if status == 200:
            assert body["id"] == targets[i] and body["state"] == "active", body
        else:
            assert body["type"].startswith("urn:kronlink:problem:") and body["detail"], body

    with f.begin() as s:
        rows = list_versions(s, "main")
        audit = [a for a in list_audit(s) if a.id > start_audit]
    active = [v.id for v in rows if v.state == VersionState.ACTIVE]
    assert len(active) == 1, [(v.id, v.state) for v in rows]

    # the audit log, replayed in commit order, is a serial history of the race
    current = versions[3].id
    activations = 0
    for a in sorted(audit, key=lambda a: a.id):
        vid = int(a.subject.split(":")[1])
        if a.action == AuditAction.RETIRED.value:
            assert vid == current, (a.subject, current)
        elif a.action in ACTIVATIONS:
            assert a.details["previous_id"] == current, (a.details, current)
            i = int(a.details["reason"].removeprefix("race "))
            assert targets[i] == vid and results[i][0] == 200  # type: ignore[index]
            current, activations = vid, activations + 1
    assert current == active[0] and activations >= 1
    assert activations <= sum(1 for r in results if r[0] == 200)  # type: ignore[index]

    with server.client() as c:
        wait_until(lambda: _served(c) == active[0], timeout_s=5)
        listed = c.get("/v1/versions").json()
        assert [v["id"] for v in listed if v["served_here"]] == active
    slowest = max(r[2] for r in results)  # type: ignore[index]
    print(
        f"{N_CALLS} concurrent activations: statuses {statuses}, {activations} committed, "
        f"slowest {slowest:.2f} s, active version id {active[0]}"
    )


def _flip_byte(path: Path) -> bytes:
    """Flip one byte in the middle of ``path``; returns the original content."""
    original = path.read_bytes()
    path.chmod(0o644)
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("registry", ["sqlite", "postgresql"], indirect=True)
def test_a_corrupt_artifact_is_never_activated_nor_served(registry, server) -> None:
    f, store = registry.factory, registry.store
    v1 = register_version(f, store, seed=1)
    v2 = register_version(f, store, seed=2, task="beta")
    v3 = register_version(f, store, seed=3, task="gamma", activate=False)
    v4 = register_version(f, store, seed=4, task="delta", activate=False)

    def folder(v) -> Path:
        return store.get(store.key_of(v.artifact.uri), v.artifact.sha256)

    weights = folder(v3) / "model.safetensors"
    original = _flip_byte(weights)  # the candidate: a promotion
    _flip_byte(folder(v1) / "config.json")  # the retired one: a rollback
    shutil.rmtree(folder(v4))  # gone altogether
    root = Path(registry.settings.data_dir)
    with server.client() as c:
        # ready with v2 itself: the replica may have loaded v1 before v2 was activated
        wait_until(
            lambda: (
                (c.get("/readyz").json()["checks"]["model:main"]["version"] or {}).get("id")
                == v2.id
            )
        )
        assert _served(c) == v2.id
        before = snapshot(f, root)
        for v, file in ((v3, "model.safetensors"), (v1, "config.json")):
            r = c.post(f"/v1/versions/{v.id}/activate", json={"reason": "x"}, headers=admin())
            p = problem(r, 409, "corrupt-artifact")
            for needle in (f"id {v.id}", "not activated", "checksum mismatch", file, "sha256"):
                assert needle in p["detail"], (needle, p["detail"])
            assert v.artifact.sha256 in p["detail"]  # the sha256 the registry expects
        p = problem(c.post(f"/v1/versions/{v4.id}/activate", headers=admin()), 409)
        assert "missing or incomplete" in p["detail"]
        assert before.diff(snapshot(f, root)) == {}
        time.sleep(3 * registry.settings.model_poll_s)  # a few polls: nothing to swap to
        assert _served(c) == v2.id
        check = c.get("/readyz").json()["checks"]["model:main"]
        assert check["version"]["id"] == v2.id and check["load_error"] is None

        # the same version once its file is whole again: activated and served
        weights.write_bytes(original)
        r = c.post(f"/v1/versions/{v3.id}/activate", headers=admin())
        assert r.status_code == 200 and r.json()["state"] == "active", r.text
        wait_until(lambda: _served(c) == v3.id, timeout_s=3)
    with f.begin() as s:
        states = {v.id: v.state for v in list_versions(s, "main")}
        refused = [a for a in list_audit(s) if a.actor == "api"]
    assert states[v3.id] == VersionState.ACTIVE and states[v2.id] == VersionState.RETIRED
    assert states[v1.id] == VersionState.RETIRED and states[v4.id] == VersionState.CANDIDATE
    assert [(a.action, a.subject) for a in refused] == [
        (AuditAction.RETIRED.value, f"version:{v2.id}"),
        (AuditAction.PROMOTED.value, f"version:{v3.id}"),
    ]
