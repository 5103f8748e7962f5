"""The commit of a trained job: retried through a database blip (issue 16
item 9), and the load phase's artifact I/O outside any registry transaction
(item 10). SQLite registry, tmp artifact folder, no broker."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from test_job import bootstrap, submit
from worker_factories import make_task, stage

import worker.job as job_module
from kronlink.registry import ArtifactStore, JobState, active_version, get_job, list_versions
from kronlink.settings import Settings
from worker.job import JobContext, Outcome, run_job


def _blip(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[int]:
    """The next ``failures`` commit transactions (after the claim) fail as a
    PostgreSQL restart fails them. Simulated: on SQLite a real blip means
    holding its lock past the 30 s busy timeout; the real one is
    tests/faults/test_fault_postgres.py, which restarts PostgreSQL mid-commit."""
    real = job_module.lineage_transaction
    calls = [0]

    @contextlib.contextmanager
    def flaky(factory, lineage):
        calls[0] += 1
        if 1 < calls[0] <= 1 + failures:  # call 1 is the claim
            raise OperationalError(
                "SELECT pg_advisory_xact_lock(...)", {}, ConnectionError("server closed")
            )
        with real(factory, lineage) as s:
            yield s

    monkeypatch.setattr(job_module, "lineage_transaction", flaky)
    return calls


def test_a_database_blip_at_commit_keeps_the_trained_model(
    ctx: JobContext, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    bootstrap(ctx)
    staged_id = stage(settings, make_task("beta", 2))
    job_id = submit(ctx, "beta", staged_id, method="kfc", lambdas=10.0)
    calls = _blip(monkeypatch, failures=2)
    with caplog.at_level(logging.WARNING, logger="worker.job"):
        assert run_job(ctx, job_id) == Outcome.SUCCEEDED
    assert calls[0] == 4  # claim, two failed commits, the one that went through
    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
        assert [v.number for v in list_versions(s, "main")] == [1, 2]
        assert active_version(s, "main").number == 2
    assert job.attempts == 1 and job.state == JobState.SUCCEEDED  # not retrained
    retries = [r for r in caplog.records if "commit attempt" in r.getMessage()]
    assert len(retries) == 2
    assert not (settings.staging_path / staged_id).exists()
    assert list(settings.scratch_path.iterdir()) == []


def test_a_database_gone_past_the_retry_budget_fails_the_job_cleanly(
    tmp_path: Path, ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    bootstrap(ctx)
    settings = ctx.settings.model_copy(update={"commit_retry_s": 0.5})
    ctx.settings = settings
    staged_id = stage(settings, make_task("beta", 2))
    job_id = submit(ctx, "beta", staged_id, method="kfc", lambdas=10.0)
    before = sorted(p.name for p in Path(settings.artifact_url, "versions", "main").iterdir())
    # two tries fail; a third would come after 0.2 + 0.4 s of backoff, past the
    # 0.5 s budget: the job fails, recorded by the next transaction
    calls = _blip(monkeypatch, failures=2)
    assert run_job(ctx, job_id) == Outcome.FAILED
    assert calls[0] == 4
    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
        assert [v.number for v in list_versions(s, "main")] == [1]
    assert job.state == JobState.FAILED and job.error.startswith("commit failed (OperationalError)")
    after = sorted(p.name for p in Path(settings.artifact_url, "versions", "main").iterdir())
    assert after == before  # the uncommitted model was removed
    assert not (settings.staging_path / staged_id).exists()


class _ProbingStore(ArtifactStore):
    """An artifact store that, on every fetch, tries a write transaction on the
    registry from another connection with no patience: it fails while anyone
    holds SQLite's write lock."""

    def __init__(self, root: str, db: Path) -> None:
        super().__init__(root)
        self.db = db
        self.probes: list[str] = []

    def get(self, key, expected_sha256, dest=None):
        con = sqlite3.connect(self.db, timeout=0.05, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            self.probes.append("free")
        except sqlite3.OperationalError as exc:
            self.probes.append(str(exc))
        finally:
            con.close()
        return super().get(key, expected_sha256, dest)


def test_the_load_phase_fetches_artifacts_outside_the_write_lock(
    ctx: JobContext, settings: Settings
) -> None:
    bootstrap(ctx)
    store = _ProbingStore(settings.artifact_url, settings.data_path / "kronlink.db")
    ctx.store = store
    job_id = submit(ctx, "beta", stage(settings, make_task("beta", 2)), method="kfc", lambdas=1.0)
    assert run_job(ctx, job_id) == Outcome.SUCCEEDED
    # the model and the one prior state were fetched, each with the registry free
    assert store.probes == ["free", "free"]
