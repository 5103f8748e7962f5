"""The job body, called directly: SQLite registry, tmp artifact folder, no broker."""

from __future__ import annotations

import time
from pathlib import Path

from worker_factories import TINY_RANKER, TINY_TRAIN, grep_tree, make_task, stage, unique_plant

from kronlink.contract import UpdateJobSpec
from kronlink.registry import (
    AuditAction,
    JobState,
    active_version,
    create_job,
    get_job,
    list_audit,
    list_task_states,
    list_versions,
    request_cancel,
)
from kronlink.settings import Settings
from worker.job import JobContext, Outcome, run_job


def submit(ctx: JobContext, task_name: str, staged_id: str, **spec) -> int:
    payload = UpdateJobSpec(
        task_name=task_name,
        staged_id=staged_id,
        train=TINY_TRAIN,
        ranker=TINY_RANKER,
        **spec,
    ).model_dump(mode="json")
    with ctx.factory.begin() as s:
        job, _ = create_job(s, lineage="main", payload=payload, idempotency_key=staged_id)
    return job.id


def bootstrap(ctx: JobContext) -> int:
    job_id = submit(ctx, "alpha", stage(ctx.settings, make_task("alpha", 1)), method="none")
    assert run_job(ctx, job_id) == Outcome.SUCCEEDED
    return job_id


def deleted_rows(ctx: JobContext, job_id: int) -> list:
    with ctx.factory.begin() as s:
        return list_audit(s, subject=f"job:{job_id}", action=AuditAction.DATA_DELETED)


def test_bootstrap_then_update_keeps_no_data(ctx: JobContext, settings: Settings) -> None:
    bootstrap(ctx)
    plant = unique_plant()
    staged_id = stage(settings, make_task("beta", 2, plant=plant))
    job_id = submit(ctx, "beta", staged_id, method="kfc", lambdas=10.0)

    assert run_job(ctx, job_id) == Outcome.SUCCEEDED
    assert run_job(ctx, job_id) == Outcome.SKIPPED  # a redelivery does nothing

    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
        v2 = active_version(s, "main")
        states = list_task_states(s, v2.id)
        assert len(list_versions(s, "main")) == 2
    assert job.state == JobState.SUCCEEDED and job.error is None
    assert v2.number == 2 and v2.parent_id is not None and v2.method == "kfc"
    assert v2.lambdas == {"alpha": 10.0} and "alpha" in v2.metrics["predicted_forgetting"]
    assert len(states) == 2
    for st in states:
        ctx.store.verify(ctx.store.key_of(st.artifact.uri), st.artifact.sha256)
    assert not (settings.staging_path / staged_id).exists()
    assert len(deleted_rows(ctx, job_id)) == 1
    assert {"validate", "load", "update", "write"} <= set(job.timings)
    assert grep_tree(Path(settings.artifact_url), plant.encode()) == []
    db_files = list(settings.data_path.glob("kronlink.db*"))
    assert db_files and all(plant.encode() not in p.read_bytes() for p in db_files)


def test_malformed_dataset_fails_and_changes_nothing(ctx: JobContext, settings: Settings) -> None:
    bootstrap(ctx)
    staged_id = stage(settings, make_task("gamma", 3))
    queries = settings.staging_path / staged_id / "queries.jsonl"
    queries.write_text('{"mention": 42}\n' + queries.read_text())
    job_id = submit(ctx, "gamma", staged_id)

    assert run_job(ctx, job_id) == Outcome.FAILED
    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
        active = active_version(s, "main")
        assert len(list_versions(s, "main")) == 1
    assert job.state == JobState.FAILED
    assert job.error.startswith("invalid dataset:") and "queries.jsonl" in job.error
    assert active.number == 1
    assert not (settings.staging_path / staged_id).exists()
    assert len(deleted_rows(ctx, job_id)) == 1


def test_cancel_mid_training_leaves_the_active_version(ctx: JobContext, settings: Settings) -> None:
    from kronlink.update import run_update

    bootstrap(ctx)
    artifacts_before = sorted(
        p.relative_to(settings.artifact_url) for p in Path(settings.artifact_url).rglob("*")
    )
    staged_id = stage(settings, make_task("delta", 4))
    job_id = submit(ctx, "delta", staged_id, method="kfc", lambdas=10.0)

    def cancelling_update(model, priors, task, request, *, on_progress, should_stop):
        def progress(p):
            on_progress(p)
            if p.phase == "train" and not should_stop():
                with ctx.factory.begin() as s:
                    request_cancel(s, job_id, actor="test")
                deadline = time.monotonic() + 10
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.05)

        return run_update(
            model, priors, task, request, on_progress=progress, should_stop=should_stop
        )

    ctx.update_fn = cancelling_update
    assert run_job(ctx, job_id) == Outcome.CANCELLED
    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
        active = active_version(s, "main")
        assert len(list_versions(s, "main")) == 1
    assert job.state == JobState.CANCELLED
    assert active.number == 1
    after = sorted(
        p.relative_to(settings.artifact_url) for p in Path(settings.artifact_url).rglob("*")
    )
    assert [p for p in after if not str(p).startswith(".tmp")] == [
        p for p in artifacts_before if not str(p).startswith(".tmp")
    ]
    assert not (settings.staging_path / staged_id).exists()
    assert len(deleted_rows(ctx, job_id)) == 1
