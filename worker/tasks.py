"""Thin Celery tasks: validate the message, call a plain function, report."""

from __future__ import annotations

import logging

from kronlink.contract import SWEEP_TASK, UPDATE_TASK, UpdateMessage
from worker.app import app, job_context

__all__ = ["sweep_task", "update_task"]

log = logging.getLogger(__name__)


@app.task(name=UPDATE_TASK, bind=True, max_retries=None)
def update_task(self, job_id: int, lineage: str) -> dict:
    """Run one update job. An earlier job of the lineage still ahead: retry later."""
    from worker.job import Outcome, run_job
    from worker.sweep import sweep_staged

    msg = UpdateMessage(job_id=job_id, lineage=lineage)
    ctx = job_context()
    outcome = run_job(ctx, msg.job_id)
    if outcome == Outcome.NOT_READY:
        raise self.retry(countdown=ctx.settings.retry_delay_s)
    try:
        sweep_staged(ctx)
    except Exception:
        log.exception("sweep after job %s failed", job_id)
    return {"job_id": msg.job_id, "outcome": outcome.value}


@app.task(name=SWEEP_TASK)
def sweep_task() -> dict:
    """The periodic sweep (schedule it with celery beat, or call it by name)."""
    from worker.sweep import sweep

    report = sweep(job_context())
    for job_id, lineage in report.queued:
        app.send_task(UPDATE_TASK, kwargs={"job_id": job_id, "lineage": lineage})
    return {"staged_deleted": report.staged_deleted, "recovered": report.recovered}
