"""A worker SIGKILLed in each phase of an update job: training, curvature
estimation, artifact writing, and inside the commit transaction.

The kill is real; the pause that lets the test kill at a known point is
injected by inject/sitecustomize.py in the worker process only. After each
kill: version 1 stays active, no partial version exists (the commit's
transaction dies with the process), the job is not stuck (the lease expires,
the sweep requeues it, a fresh worker completes it anchored on version 1),
the killed attempt's artifacts are removed by the sweep, and the staged data
is gone at the end.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from worker_factories import TINY_TRAIN
from worker_procs import (
    LEASE_S,
    TIMEOUT_S,
    artifact_keys,
    bootstrap_v1,
    job_row,
    start_worker,
    stop_worker,
    submit,
    sweep_until_recovered,
    wait_finished,
)

from kronlink.registry import JobState, active_version, list_task_states, list_versions

INJECT = Path(__file__).parent / "inject"


def _kill_at(values: dict, ctx, log: Path, job_id: int, phase: str, marker: Path) -> None:
    proc = start_worker(
        values,
        log,
        inject=INJECT,
        KRONLINK_LEASE_S=str(LEASE_S),
        KRONLINK_TEST_PAUSE_AT=phase,
        KRONLINK_TEST_MARKER=str(marker),
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            # No registry reads here: paused in the commit, the worker holds
            # SQLite's write lock and a read transaction would wait on it.
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"never reached {phase}"
            time.sleep(0.05)
        assert int(marker.read_text()) == proc.pid  # the job runs in the process we kill
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_worker(proc)


@pytest.mark.parametrize("phase", ["train", "curvature", "write", "commit"])
def test_sigkill_in_each_phase_loses_nothing_and_recovers(
    phase: str, env, tmp_path: Path, capsys
) -> None:
    values, ctx = env
    log = tmp_path / "worker.log"
    bootstrap_v1(ctx)
    with ctx.factory.begin() as s:
        v1 = active_version(s, "main")
    job_id = submit(tmp_path, capsys, "beta", 2, TINY_TRAIN)
    staged = ctx.settings.staging_path / job_row(ctx, job_id).payload["staged_id"]

    _kill_at(values, ctx, log, job_id, phase, tmp_path / "paused")

    job = job_row(ctx, job_id)
    assert job.state == JobState.RUNNING and job.attempts == 1
    with ctx.factory.begin() as s:
        assert [v.number for v in list_versions(s, "main")] == [1]
        assert active_version(s, "main").id == v1.id
    written = [k for k in artifact_keys(ctx) if f"j{job_id}-a1" in k]
    assert bool(written) == (phase in ("write", "commit")), written
    assert staged.is_dir()
    # the killed attempt's working files are in the worker's own data folder
    # (issue 16 item 13: they were in the system temp folder, never deleted)
    # (the commit comes after the job has cleared its scratch: nothing is left then)
    scratch = ctx.settings.scratch_path / f"job-{job_id}-a1"
    assert scratch.is_dir() == (phase != "commit")
    assert (scratch / "out-model").is_dir() == (phase == "write")

    report = sweep_until_recovered(ctx, job_id)
    assert job_row(ctx, job_id).state == JobState.QUEUED
    assert report.scratch_removed == ([scratch.name] if phase != "commit" else [])
    assert not scratch.exists()
    # the write pause comes after the model folder; the commit after all three
    expected = {
        "train": set(),
        "curvature": set(),
        "write": {"versions"},
        "commit": {"versions", "states", "ontologies"},
    }[phase]
    assert {k.split("/")[0] for k in report.orphans_removed} == expected
    assert [k for k in artifact_keys(ctx) if f"j{job_id}-a1" in k] == []

    proc = start_worker(values, log)
    try:
        assert wait_finished(ctx, job_id, log) == "succeeded"
    finally:
        stop_worker(proc)
    with ctx.factory.begin() as s:
        v2 = active_version(s, "main")
        assert [v.number for v in list_versions(s, "main")] == [1, 2]
        states = list_task_states(s, v2.id)
    assert v2.number == 2 and v2.parent_id == v1.id and len(states) == 2
    for st in states:
        ctx.store.verify(ctx.store.key_of(st.artifact.uri), st.artifact.sha256)
    assert not staged.exists()
    assert list(ctx.settings.staging_path.iterdir()) == []
    # a later sweep keeps everything the registry points at
    assert ctx.store.exists(ctx.store.key_of(v2.artifact.uri))
    from worker.sweep import sweep_orphans

    assert sweep_orphans(ctx) == []


def test_sigkill_between_commit_and_data_deletion_the_sweep_deletes_at_once(
    env, tmp_path: Path, capsys
) -> None:
    from kronlink.registry import AuditAction, list_audit
    from worker.sweep import sweep

    values, ctx = env
    bootstrap_v1(ctx)
    job_id = submit(tmp_path, capsys, "beta", 2, TINY_TRAIN)
    staged = ctx.settings.staging_path / job_row(ctx, job_id).payload["staged_id"]
    _kill_at(values, ctx, tmp_path / "worker.log", job_id, "delete", tmp_path / "paused")

    job = job_row(ctx, job_id)
    assert job.state == JobState.SUCCEEDED and staged.is_dir()
    with ctx.factory.begin() as s:
        assert active_version(s, "main").number == 2
    report = sweep(ctx)  # no waiting for staged_max_age_s: the job is over
    assert report.staged_deleted == [staged.name] and not staged.exists()
    with ctx.factory.begin() as s:
        rows = list_audit(s, subject=f"job:{job_id}", action=AuditAction.DATA_DELETED)
    assert len(rows) == 1 and rows[0].details["files"] == 3
    assert report.orphans_removed == []  # v2's artifacts are referenced
