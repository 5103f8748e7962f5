"""Failure tests with a real Celery worker subprocess on the embedded default
(SQLite registry, SQLite broker): a worker SIGKILLed mid-training, and two
jobs of one lineage submitted back to back.

The SQLite broker drops a message once it is delivered (no redelivery by
timeout), so a killed worker's job comes back through the lease: it expires,
``recover_expired_jobs`` (the sweep) requeues it, and the next worker's startup
sweep sends it again (docs/worker.md, "A lost worker's job is not lost").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from worker_factories import TINY_RANKER, TINY_TRAIN, make_task, stage

from kronlink.cli import main
from kronlink.contract import UpdateJobSpec
from kronlink.data.io import save_task
from kronlink.registry import (
    ArtifactStore,
    AuditAction,
    JobState,
    active_version,
    create_engine_from_url,
    create_job,
    get_job,
    list_audit,
    list_task_states,
    list_versions,
    make_session_factory,
    upgrade,
)
from kronlink.settings import get_settings
from worker.job import JobContext, Outcome, run_job
from worker.sweep import sweep

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
LEASE_S = 4.0


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Embedded-default settings in tmp_path, shared with the worker subprocess."""
    values = {
        "KRONLINK_DATA_DIR": str(tmp_path / "data"),
        "KRONLINK_QUEUE": f"q{uuid.uuid4().hex[:8]}",
        # A long lease (no heartbeat during a tiny job) and rare progress writes
        # (phase changes only): on SQLite a progress write that races a
        # heartbeat fails the job with "database is locked" (see
        # test_progress_write_survives_a_concurrent_heartbeat below).
        "KRONLINK_LEASE_S": "600",
        "KRONLINK_PROGRESS_INTERVAL_S": "1000",
        "KRONLINK_RETRY_DELAY_S": "1",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database)
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    engine = create_engine_from_url(settings.database)
    ctx = JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner="test-process",
    )
    yield values, ctx
    engine.dispose()
    get_settings.cache_clear()


def _bootstrap(ctx: JobContext) -> None:
    """Version 1 of lineage "main", by the job body called in this process."""
    payload = UpdateJobSpec(
        task_name="alpha",
        staged_id=stage(ctx.settings, make_task("alpha", 1)),
        method="none",
        train=TINY_TRAIN,
        ranker=TINY_RANKER,
    ).model_dump(mode="json")
    with ctx.factory.begin() as s:
        job, _ = create_job(s, lineage="main", payload=payload)
    assert run_job(ctx, job.id) == Outcome.SUCCEEDED


def _submit(tmp_path: Path, capsys, name: str, seed: int, train: dict) -> int:
    """``kronlink submit`` (stage, job row, message on the broker); returns the job id."""
    save_task(make_task(name, seed), tmp_path / name)
    argv = ["submit", str(tmp_path / name), "--task", name, "--method", "kfc", "--lambda", "10"]
    argv += ["--train", json.dumps(train), "--ranker", json.dumps(TINY_RANKER)]
    assert main(argv) == 0
    return int(capsys.readouterr().out.split()[0])


def _start_worker(values: dict, log: Path, **overrides: str) -> subprocess.Popen:
    """``kronlink worker`` execs celery in place: the Popen pid is the solo-pool
    process that runs the job body."""
    child_env = {**os.environ, **values, **overrides, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from kronlink.cli import main; "
                "sys.exit(main(['worker', '--loglevel', 'WARNING']))",
            ],
            cwd=REPO,
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _job(ctx: JobContext, job_id: int):
    with ctx.factory.begin() as s:
        return get_job(s, job_id)


def _wait_finished(ctx: JobContext, job_id: int, log: Path) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = _job(ctx, job_id)
        if job.finished:
            return job.state.value + (f": {job.error}" if job.error else "")
        time.sleep(0.3)
    raise AssertionError(
        f"job {job_id} not finished after {TIMEOUT_S} s ({job.state.value}); worker log:\n"
        + log.read_text(errors="replace")[-3000:]
    )


def _artifact_keys(ctx: JobContext) -> list[str]:
    root = Path(ctx.settings.artifact_url)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _kill_in_training(values: dict, ctx: JobContext, log: Path, job_id: int, **env: str) -> None:
    """Start a worker with a short lease, wait until the job trains, SIGKILL the worker."""
    proc = _start_worker(values, log, KRONLINK_LEASE_S=str(LEASE_S), **env)
    try:
        # the process we kill is the celery worker itself, not a wrapper
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            if b"celery" in cmdline:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert b"solo" in cmdline

        while True:
            job = _job(ctx, job_id)
            if job.phase == "train":  # progress writes are rare here: give it steps
                time.sleep(0.5)
                job = _job(ctx, job_id)
                assert job.phase == "train" and job.state == JobState.RUNNING, job
                break
            assert not job.finished, f"job ended before the kill: {job.state} {job.error}"
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"never reached training: {job.phase}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _stop(proc)


def _sweep_until_recovered(ctx: JobContext, job_id: int):
    """The lease expires without heartbeats; the sweep then recovers the job."""
    report = sweep(ctx)
    assert report.recovered == []  # lease still live right after the kill
    deadline = time.monotonic() + 4 * LEASE_S + 10
    while job_id not in report.recovered:
        assert time.monotonic() < deadline, "the expired lease was never recovered"
        time.sleep(0.5)
        report = sweep(ctx)
    return report


def test_sigkill_mid_training_leaves_v1_active_and_nothing_stuck(env, tmp_path, capsys) -> None:
    values, ctx = env
    log = tmp_path / "worker.log"
    _bootstrap(ctx)
    # long enough to be caught in "train" (one step per epoch, a dev eval each)
    job_id = _submit(tmp_path, capsys, "beta", 2, {**TINY_TRAIN, "epochs": 600})
    staged_id = _job(ctx, job_id).payload["staged_id"]
    staged = ctx.settings.staging_path / staged_id

    _kill_in_training(values, ctx, log, job_id)

    # killed mid-training: v1 still active, no version 2, no artifact of job 2
    job = _job(ctx, job_id)
    assert job.state == JobState.RUNNING and job.attempts == 1 and job.phase == "train"
    with ctx.factory.begin() as s:
        active = active_version(s, "main")
        versions = list_versions(s, "main")
    assert active.number == 1 and [v.number for v in versions] == [1]
    assert [k for k in _artifact_keys(ctx) if f"j{job_id}-" in k] == []
    assert staged.is_dir()  # left to the re-run or the sweep

    # the lease expires; the sweep requeues the job (attempt counted)
    report = _sweep_until_recovered(ctx, job_id)
    job = _job(ctx, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 1
    assert job.owner is None and job.lease_until is None
    assert (job_id, "main") in report.queued
    assert staged.is_dir()  # a requeued job keeps its data for the re-run

    # a fresh worker's startup sweep re-sends the queued job (its message was
    # consumed by the killed worker) and the second attempt completes it
    proc = _start_worker(values, log)  # long lease: no heartbeat races a progress write
    try:
        assert _wait_finished(ctx, job_id, log) == "succeeded"
    finally:
        _stop(proc)
    job = _job(ctx, job_id)
    assert job.attempts == 2 and job.lease_until is None
    with ctx.factory.begin() as s:
        v2 = active_version(s, "main")
        states = list_task_states(s, v2.id)
        assert [v.number for v in list_versions(s, "main")] == [1, 2]
    assert v2.number == 2 and v2.parent_id == active.id and len(states) == 2
    keys = _artifact_keys(ctx)
    assert any(f"j{job_id}-a2" in k for k in keys)
    assert not any(f"j{job_id}-a1" in k for k in keys)
    assert not staged.exists()
    assert list(ctx.settings.staging_path.iterdir()) == []


def test_sigkill_on_the_last_attempt_fails_the_job_and_the_sweep_deletes_the_data(
    env, tmp_path, capsys
) -> None:
    """With one attempt allowed, a killed job is not re-run: the sweep fails it,
    deletes its staged data at once (not after staged_max_age_s) and audits it."""
    values, ctx = env
    log = tmp_path / "worker.log"
    _bootstrap(ctx)
    job_id = _submit(tmp_path, capsys, "beta", 2, {**TINY_TRAIN, "epochs": 600})
    staged = ctx.settings.staging_path / _job(ctx, job_id).payload["staged_id"]
    _kill_in_training(values, ctx, log, job_id)
    assert staged.is_dir()

    ctx.settings = ctx.settings.model_copy(update={"max_attempts": 1})
    report = _sweep_until_recovered(ctx, job_id)
    job = _job(ctx, job_id)
    assert job.state == JobState.FAILED and "gave up after 1 attempt" in job.error
    assert job.lease_until is None and (job_id, "main") not in report.queued
    assert not staged.exists()
    with ctx.factory.begin() as s:
        assert [v.number for v in list_versions(s, "main")] == [1]
        assert active_version(s, "main").number == 1
        deleted = list_audit(s, subject=f"job:{job_id}", action=AuditAction.DATA_DELETED)
    assert len(deleted) == 1 and deleted[0].details["files"] == 3
    assert [k for k in _artifact_keys(ctx) if f"j{job_id}-" in k] == []
    assert run_job(ctx, job_id) == Outcome.SKIPPED  # a late redelivery does nothing


def test_two_jobs_for_one_lineage_run_in_order(env, tmp_path, capsys) -> None:
    values, ctx = env
    log = tmp_path / "worker.log"
    _bootstrap(ctx)
    with ctx.factory.begin() as s:
        v1 = active_version(s, "main")
    job2 = _submit(tmp_path, capsys, "beta", 2, TINY_TRAIN)
    job3 = _submit(tmp_path, capsys, "gamma", 3, TINY_TRAIN)
    assert job2 < job3

    proc = _start_worker(values, log)
    try:
        assert _wait_finished(ctx, job2, log) == "succeeded"
        assert _wait_finished(ctx, job3, log) == "succeeded"
    finally:
        _stop(proc)

    j2, j3 = _job(ctx, job2), _job(ctx, job3)
    assert j2.finished_at <= j3.started_at  # one at a time, in submission order
    with ctx.factory.begin() as s:
        versions = {v.number: v for v in list_versions(s, "main")}
        active = active_version(s, "main")
        v2_states = list_task_states(s, versions[2].id)
        v3_states = list_task_states(s, versions[3].id)
    assert sorted(versions) == [1, 2, 3]
    assert versions[2].parent_id == v1.id and versions[3].parent_id == versions[2].id
    assert active.id == versions[3].id
    assert versions[2].lambdas == {"alpha": 10.0}
    assert versions[3].lambdas == {"alpha": 10.0, "beta": 10.0}
    assert len(v2_states) == 2 and len(v3_states) == 3
    # v3 carries v2's task states (alpha, beta) unchanged, plus its own (gamma)
    assert {r.task_id: r.artifact.sha256 for r in v2_states}.items() <= {
        r.task_id: r.artifact.sha256 for r in v3_states
    }.items()
    assert list(ctx.settings.staging_path.iterdir()) == []


def test_progress_write_survives_a_concurrent_heartbeat(env) -> None:
    """What the worker's two threads do: the heartbeat thread renews the lease
    while the training thread writes progress, each on its own connection."""
    import threading

    from kronlink.registry import claim_job, heartbeat, lineage_transaction, update_progress

    _, ctx = env
    with ctx.factory.begin() as s:
        job, _ = create_job(s, lineage="main", payload={})
    with lineage_transaction(ctx.factory, "main") as s:
        assert claim_job(s, job.id, owner="w", lease_s=600) is not None
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                with ctx.factory.begin() as s:
                    heartbeat(s, job.id, owner="w", lease_s=600)
            except Exception:  # the worker's heartbeat loop logs and retries too
                pass

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        deadline = time.monotonic() + 3
        step = 0
        while time.monotonic() < deadline:
            step += 1
            with ctx.factory.begin() as s:
                update_progress(s, job.id, owner="w", phase="train", progress={"step": step})
    finally:
        stop.set()
        beater.join(timeout=10)
