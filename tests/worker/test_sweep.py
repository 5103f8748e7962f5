"""The staging sweep on real folders: what goes, what stays, and the audit rows."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kronlink.registry import AuditAction, list_audit
from worker.job import JobContext
from worker.sweep import sweep_staged


def _folder(root: Path, name: str, age_s: float, inner_age_s: float | None = None) -> Path:
    path = root / name
    (path / "sub").mkdir(parents=True)
    f = path / "sub" / "queries.jsonl"
    f.write_text("{}\n")
    old = time.time() - age_s
    inner = time.time() - (age_s if inner_age_s is None else inner_age_s)
    os.utime(f, (inner, inner))
    for p in (path / "sub", path):
        os.utime(p, (old, old))
    return path


def test_sweep_staged_deletes_stale_and_abandoned_partial_uploads(ctx: JobContext) -> None:
    root = ctx.settings.staging_path
    old = ctx.settings.staged_max_age_s + 60
    gone = [
        _folder(root, "a" * 32, old),  # stale staged dataset
        _folder(root, ".upload-dead", old),  # an API process died mid-upload
        _folder(root, f".{'b' * 32}.part", old),  # kronlink submit died mid-copy
    ]
    kept = [
        _folder(root, "c" * 32, 5),  # fresh
        _folder(root, ".upload-live", old, inner_age_s=1),  # still receiving
        _folder(root, ".other", old),  # not ours
    ]
    deleted = sweep_staged(ctx)
    assert sorted(deleted) == sorted(p.name for p in gone)
    assert [p.exists() for p in gone] == [False] * 3
    assert [p.exists() for p in kept] == [True] * 3
    with ctx.factory.begin() as s:
        rows = list_audit(s, action=AuditAction.DATA_DELETED)
    assert sorted(r.subject for r in rows) == sorted(f"staging:{p.name}" for p in gone)
    assert all(r.details["files"] == 1 and r.details["ending"] == "sweep" for r in rows)


def test_a_running_worker_sweeps_periodically(env, tmp_path: Path) -> None:
    """Staged data left by a dead job goes while the worker idles, not only at
    its next start or job."""
    from worker_procs import start_worker, stop_worker

    values, ctx = env
    old = ctx.settings.staged_max_age_s + 60
    first = _folder(ctx.settings.staging_path, "e" * 32, old)  # for the startup sweep
    proc = start_worker(values, tmp_path / "worker.log", KRONLINK_SWEEP_INTERVAL_S="0.5")
    try:
        deadline = time.monotonic() + 60
        while first.exists():  # gone: the startup sweep ran, the periodic one starts
            assert proc.poll() is None and time.monotonic() < deadline, "worker never ready"
            time.sleep(0.2)
        stale = _folder(ctx.settings.staging_path, "d" * 32, old)
        deadline = time.monotonic() + 20
        while stale.exists():
            assert time.monotonic() < deadline, "the periodic sweep never ran"
            time.sleep(0.2)
    finally:
        stop_worker(proc)
    with ctx.factory.begin() as s:
        rows = list_audit(s, subject=f"staging:{stale.name}", action=AuditAction.DATA_DELETED)
    assert len(rows) == 1
