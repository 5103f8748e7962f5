"""Failure tests with a real Celery worker subprocess on the embedded default
(SQLite registry, SQLite broker): a worker SIGKILLed mid-training, and two
jobs of one lineage submitted back to back. Helpers: worker_procs.py."""

from __future__ import annotations

from worker_factories import TINY_TRAIN
from worker_procs import (
    artifact_keys,
    bootstrap_v1,
    job_row,
    kill_in_training,
    start_worker,
    stop_worker,
    submit,
    sweep_until_recovered,
    wait_finished,
)

from kronlink.registry import (
    AuditAction,
    JobState,
    active_version,
    create_job,
    get_job,
    list_audit,
    list_task_states,
    list_versions,
)
from worker.job import Outcome, run_job


def test_sigkill_mid_training_leaves_v1_active_and_nothing_stuck(env, tmp_path, capsys) -> None:
    values, ctx = env
    log = tmp_path / "worker.log"
    bootstrap_v1(ctx)
    # long enough to be caught in "train" (one step per epoch, a dev eval each)
    job_id = submit(tmp_path, capsys, "beta", 2, {**TINY_TRAIN, "epochs": 600})
    staged_id = job_row(ctx, job_id).payload["staged_id"]
    staged = ctx.settings.staging_path / staged_id

    kill_in_training(values, ctx, log, job_id)

    # killed mid-training: v1 still active, no version 2, no artifact of job 2
    job = job_row(ctx, job_id)
    assert job.state == JobState.RUNNING and job.attempts == 1 and job.phase == "train"
    with ctx.factory.begin() as s:
        active = active_version(s, "main")
        versions = list_versions(s, "main")
    assert active.number == 1 and [v.number for v in versions] == [1]
    assert [k for k in artifact_keys(ctx) if f"j{job_id}-" in k] == []
    assert staged.is_dir()  # left to the re-run or the sweep

    # the lease expires; the sweep requeues the job (attempt counted)
    report = sweep_until_recovered(ctx, job_id)
    job = job_row(ctx, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 1
    assert job.owner is None and job.lease_until is None
    assert (job_id, "main") in report.queued
    assert staged.is_dir()  # a requeued job keeps its data for the re-run

    # a fresh worker's startup sweep re-sends the queued job (its message was
    # consumed by the killed worker) and the second attempt completes it
    proc = start_worker(values, log)  # long lease: no heartbeat races a progress write
    try:
        assert wait_finished(ctx, job_id, log) == "succeeded"
    finally:
        stop_worker(proc)
    job = job_row(ctx, job_id)
    assert job.attempts == 2 and job.lease_until is None
    with ctx.factory.begin() as s:
        v2 = active_version(s, "main")
        states = list_task_states(s, v2.id)
        assert [v.number for v in list_versions(s, "main")] == [1, 2]
    assert v2.number == 2 and v2.parent_id == active.id and len(states) == 2
    keys = artifact_keys(ctx)
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
    bootstrap_v1(ctx)
    job_id = submit(tmp_path, capsys, "beta", 2, {**TINY_TRAIN, "epochs": 600})
    staged = ctx.settings.staging_path / job_row(ctx, job_id).payload["staged_id"]
    kill_in_training(values, ctx, log, job_id)
    assert staged.is_dir()

    ctx.settings = ctx.settings.model_copy(update={"max_attempts": 1})
    report = sweep_until_recovered(ctx, job_id)
    job = job_row(ctx, job_id)
    assert job.state == JobState.FAILED and "gave up after 1 attempt" in job.error
    assert job.lease_until is None and (job_id, "main") not in report.queued
    assert not staged.exists()
    with ctx.factory.begin() as s:
        assert [v.number for v in list_versions(s, "main")] == [1]
        assert active_version(s, "main").number == 1
        deleted = list_audit(s, subject=f"job:{job_id}", action=AuditAction.DATA_DELETED)
    assert len(deleted) == 1 and deleted[0].details["files"] == 3
    assert [k for k in artifact_keys(ctx) if f"j{job_id}-" in k] == []
    assert run_job(ctx, job_id) == Outcome.SKIPPED  # a late redelivery does nothing


def test_two_jobs_for_one_lineage_run_in_order(env, tmp_path, capsys) -> None:
    values, ctx = env
    log = tmp_path / "worker.log"
    bootstrap_v1(ctx)
    with ctx.factory.begin() as s:
        v1 = active_version(s, "main")
    job2 = submit(tmp_path, capsys, "beta", 2, TINY_TRAIN)
    job3 = submit(tmp_path, capsys, "gamma", 3, TINY_TRAIN)
    assert job2 < job3

    proc = start_worker(values, log)
    try:
        assert wait_finished(ctx, job2, log) == "succeeded"
        assert wait_finished(ctx, job3, log) == "succeeded"
    finally:
        stop_worker(proc)

    j2, j3 = job_row(ctx, job2), job_row(ctx, job3)
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
    beats: list[float] = []
    errors: list[str] = []

    def beat() -> None:
        while not stop.is_set():
            try:
                with ctx.factory.begin() as s:
                    info = heartbeat(s, job.id, owner="w", lease_s=600)
                beats.append(info.lease_until.timestamp())
            except Exception as exc:  # recorded: the test fails on any
                errors.append(f"{type(exc).__name__}: {exc}")

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    writes = 0
    try:
        # Interleave until both threads have written many times (a count, not a sleep).
        while writes < 100 or len(beats) < 20:
            writes += 1
            with ctx.factory.begin() as s:
                update_progress(s, job.id, owner="w", phase="train", progress={"step": writes})
            assert writes < 100_000, "the heartbeat thread never got a write in"
    finally:
        stop.set()
        beater.join(timeout=10)
    assert errors == [], errors[:3]
    assert beats == sorted(beats)  # each renewal extended the lease
    with ctx.factory.begin() as s:
        row = get_job(s, job.id)
    assert row.progress == {"step": writes} and row.phase == "train"
    assert row.state == JobState.RUNNING and row.owner == "w"
