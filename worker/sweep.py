"""The sweep: delete staged data older than the limit, recover jobs whose worker died."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kronlink.registry import (
    AuditAction,
    JobState,
    list_jobs,
    record_audit,
    recover_expired_jobs,
)
from worker.job import JobContext, delete_leftover, delete_staged

__all__ = ["SweepReport", "sweep", "sweep_staged"]

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    staged_deleted: list[str] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)  # requeued or failed after max attempts
    queued: list[tuple[int, str]] = field(default_factory=list)  # (job id, lineage) to re-send
    temporary_removed: int = 0


def sweep_staged(ctx: JobContext, *, now: float | None = None) -> list[str]:
    """Delete staged folders older than ``staged_max_age_s``, except a running job's."""
    root = ctx.settings.staging_path
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    with ctx.factory.begin() as s:
        live = {j.payload.get("staged_id") for j in list_jobs(s, state=JobState.RUNNING)}
    deleted = []
    for path in sorted(root.iterdir()):
        if path.name in live or path.name.startswith("."):
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


def sweep(ctx: JobContext, *, now: float | None = None) -> SweepReport:
    """Recover expired leases, delete stale staged data and artifact-store debris."""
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
    return report
