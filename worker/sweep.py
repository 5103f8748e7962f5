"""The sweep: delete staged data older than the limit, recover jobs whose worker died,
remove artifacts of job attempts that ended without committing them."""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kronlink.errors import ConfigError
from kronlink.registry import (
    AuditAction,
    JobState,
    list_jobs,
    record_audit,
    recover_expired_jobs,
    referenced_artifact_uris,
)
from worker.job import JobContext, delete_leftover, delete_staged

__all__ = ["SweepReport", "sweep", "sweep_orphans", "sweep_scratch", "sweep_staged"]

# The worker writes every artifact under a folder named for the job attempt
# (worker.job: versions/<lineage>/j<job>-a<attempt>, states/<lineage>/j..-a../<task>,
# ontologies/<name>/j..-a..).
_ATTEMPT = re.compile(r"^j(\d+)-a(\d+)$")
_ATTEMPT_ROOTS = ("versions", "states", "ontologies")
_SCRATCH = re.compile(r"^job-(\d+)-a(\d+)$")  # worker.job.scratch_name

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    staged_deleted: list[str] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)  # requeued or failed after max attempts
    queued: list[tuple[int, str]] = field(default_factory=list)  # (job id, lineage) to re-send
    temporary_removed: int = 0
    orphans_removed: list[str] = field(default_factory=list)
    scratch_removed: list[str] = field(default_factory=list)


def _newest_mtime(path: Path) -> float:
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def sweep_staged(ctx: JobContext, *, now: float | None = None) -> list[str]:
    """Delete staged folders of finished jobs at once, and any other older than
    ``staged_max_age_s`` except a running job's."""
    root = ctx.settings.staging_path
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    with ctx.factory.begin() as s:
        by_staged = {j.payload.get("staged_id"): j for j in list_jobs(s)}
    deleted = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            # Half-received uploads (the service's .upload-<id>, submit's
            # .<id>.part) whose writer died: by the newest file, since a live
            # upload keeps writing.
            partial = path.name.startswith(".upload-") or path.name.endswith(".part")
            if not partial or now - _newest_mtime(path) <= ctx.settings.staged_max_age_s:
                continue
            job = None
        else:
            job = by_staged.get(path.name)
        if job is not None and job.finished:  # its worker died after the commit
            delete_leftover(ctx, job)
            log.info("sweep: deleted staged data %s of finished job %s", path.name, job.id)
            deleted.append(path.name)
            continue
        if job is not None and job.state == JobState.RUNNING:
            continue
        if now - path.stat().st_mtime <= ctx.settings.staged_max_age_s:
            continue
        counts = delete_staged(path)
        with ctx.factory.begin() as s:
            record_audit(
                s,
                AuditAction.DATA_DELETED,
                f"staging:{path.name}",
                actor=ctx.owner,
                details={**counts, "ending": "sweep"},
            )
        log.info("sweep: deleted staged data %s (%d files)", path.name, counts["files"])
        deleted.append(path.name)
    return deleted


def sweep_orphans(ctx: JobContext) -> list[str]:
    """Delete artifacts that a job attempt wrote but never committed (its worker
    was killed between the write and the commit, or the commit failed and the
    cleanup died with it). Returns the attempt folders removed.

    An attempt folder goes only when no registry row points into it and its
    attempt cannot commit any more: the job is finished, or has been claimed
    again since. Jobs are read before references, so a job that committed
    after the first read is still running in that read and is skipped.
    """
    store = ctx.store
    with ctx.factory.begin() as s:
        jobs = {j.id: j for j in list_jobs(s)}
    with ctx.factory.begin() as s:
        referenced = set()
        for uri in referenced_artifact_uris(s):
            try:
                referenced.add(store.key_of(uri))
            except ConfigError:  # a row from another store root: not ours to judge
                continue
    removed = []
    for root in _ATTEMPT_ROOTS:
        for group in store.children(root):
            for name in store.children(f"{root}/{group}"):
                m = _ATTEMPT.match(name)
                if m is None:
                    continue
                job = jobs.get(int(m[1]))
                attempt = int(m[2])
                if job is None or attempt > job.attempts:
                    continue  # newer than our snapshot of the jobs
                if job.state == JobState.RUNNING and attempt == job.attempts:
                    continue  # the live attempt: it may still commit
                key = f"{root}/{group}/{name}"
                if any(r == key or r.startswith(key + "/") for r in referenced):
                    continue
                store.delete(key)
                removed.append(key)
                log.info("sweep: removed uncommitted artifacts %s", key)
    return removed


def sweep_scratch(ctx: JobContext) -> list[str]:
    """Delete job scratch folders that no running attempt owns: a worker killed
    mid-job leaves its fetched model, priors and written artifacts there (up
    to gigabytes on a GPU host). The attempt that is running now keeps its
    folder; an attempt that ended, or was superseded by a later claim, does not."""
    root = ctx.settings.scratch_path
    if not root.is_dir():
        return []
    with ctx.factory.begin() as s:
        jobs = {j.id: j for j in list_jobs(s)}
    removed = []
    for path in sorted(root.iterdir()):
        m = _SCRATCH.match(path.name)
        if m is None:
            continue
        job = jobs.get(int(m[1]))
        if job is None or int(m[2]) > job.attempts:
            continue  # newer than our snapshot of the jobs
        if job.state == JobState.RUNNING and int(m[2]) == job.attempts:
            continue  # the live attempt
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
        log.info("sweep: removed scratch folder %s", path)
    return removed


def sweep(ctx: JobContext, *, now: float | None = None) -> SweepReport:
    """Recover expired leases, delete stale staged data, artifact-store debris and
    artifacts of attempts that will never commit."""
    report = SweepReport()
    with ctx.factory.begin() as s:
        changed = recover_expired_jobs(s, max_attempts=ctx.settings.max_attempts)
        report.recovered = [j.id for j in changed]
        report.queued = [(j.id, j.lineage) for j in list_jobs(s, state=JobState.QUEUED)]
    for job in changed:
        if job.state == JobState.FAILED:  # out of attempts: nobody will read its data again
            delete_leftover(ctx, job)
    report.staged_deleted = sweep_staged(ctx, now=now)
    report.temporary_removed = ctx.store.sweep_temporary()
    report.orphans_removed = sweep_orphans(ctx)
    report.scratch_removed = sweep_scratch(ctx)
    return report
