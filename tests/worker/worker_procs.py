"""Shared by the worker fault tests: a real ``kronlink worker`` subprocess on
the embedded default, jobs submitted through ``kronlink submit``, and the
sweep that recovers what a killed worker left.

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
from pathlib import Path

from worker_factories import TINY_RANKER, TINY_TRAIN, make_task, stage

from kronlink.cli import main
from kronlink.contract import UpdateJobSpec
from kronlink.data.io import save_task
from kronlink.registry import JobState, create_job, get_job
from worker.job import JobContext, Outcome, run_job
from worker.sweep import sweep

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
LEASE_S = 4.0


def bootstrap_v1(ctx: JobContext) -> None:
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


def submit(tmp_path: Path, capsys, name: str, seed: int, train: dict) -> int:
    """``kronlink submit`` (stage, job row, message on the broker); returns the job id."""
    save_task(make_task(name, seed), tmp_path / name)
    argv = ["submit", str(tmp_path / name), "--task", name, "--method", "kfc", "--lambda", "10"]
    argv += ["--train", json.dumps(train), "--ranker", json.dumps(TINY_RANKER)]
    assert main(argv) == 0
    return int(capsys.readouterr().out.split()[0])


def start_worker(
    values: dict, log: Path, *, inject: Path | None = None, **overrides: str
) -> subprocess.Popen:
    """``kronlink worker`` execs celery in place: the Popen pid is the solo-pool
    process that runs the job body. ``inject``: a folder put first on the
    worker's PYTHONPATH (a sitecustomize that injects a pause, say)."""
    child_env = {
        **os.environ,
        **values,
        **overrides,
        "PYTHONPATH": os.pathsep.join([str(p) for p in (inject, REPO) if p is not None]),
    }
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


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def job_row(ctx: JobContext, job_id: int):
    with ctx.factory.begin() as s:
        return get_job(s, job_id)


def wait_finished(ctx: JobContext, job_id: int, log: Path) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = job_row(ctx, job_id)
        if job.finished:
            return job.state.value + (f": {job.error}" if job.error else "")
        time.sleep(0.3)
    raise AssertionError(
        f"job {job_id} not finished after {TIMEOUT_S} s ({job.state.value}); worker log:\n"
        + log.read_text(errors="replace")[-3000:]
    )


def artifact_keys(ctx: JobContext) -> list[str]:
    root = Path(ctx.settings.artifact_url)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def kill_in_training(values: dict, ctx: JobContext, log: Path, job_id: int, **env: str) -> None:
    """Start a worker with a short lease, wait until the job trains, SIGKILL the worker."""
    proc = start_worker(values, log, KRONLINK_LEASE_S=str(LEASE_S), **env)
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
            job = job_row(ctx, job_id)
            if job.phase == "train":  # progress writes are rare here: give it steps
                time.sleep(0.5)
                job = job_row(ctx, job_id)
                assert job.phase == "train" and job.state == JobState.RUNNING, job
                break
            assert not job.finished, f"job ended before the kill: {job.state} {job.error}"
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"never reached training: {job.phase}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_worker(proc)


def sweep_until_recovered(ctx: JobContext, job_id: int):
    """The lease expires without heartbeats; the sweep then recovers the job."""
    report = sweep(ctx)
    assert report.recovered == []  # lease still live right after the kill
    deadline = time.monotonic() + 4 * LEASE_S + 10
    while job_id not in report.recovered:
        assert time.monotonic() < deadline, "the expired lease was never recovered"
        time.sleep(0.5)
        report = sweep(ctx)
    return report
