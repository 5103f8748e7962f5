"""Repository functions for update jobs: submission, claims, leases, progress, cancel.

The worker's loop, in terms of this module::

    with lineage_transaction(factory, lineage) as s:      # lineage lock held
        job = claim_job(s, job_id, owner=worker_id, lease_s=600)
    ...                                                    # train; every minute:
    with factory.begin() as s:
        heartbeat(s, job.id, owner=worker_id, lease_s=600, progress={...}, phase="train")
    ...
    with lineage_transaction(factory, lineage) as s:
        finish_job(s, job.id, JobState.SUCCEEDED, owner=worker_id)

A job runs under a lease: ``lease_until`` moves forward with each heartbeat.
A worker that dies stops heart-beating; :func:`recover_expired_jobs` (called by
every claim of the lineage, and by a periodic sweep) requeues its job, or fails
it once it has been claimed ``max_attempts`` times.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kronlink.errors import ConfigError
from kronlink.registry.db import lock_lineage, row_by_id
from kronlink.registry.errors import InvalidTransitionError, LeaseLostError
from kronlink.registry.models import FINISHED_JOB_STATES, AuditAction, Job, JobState, utcnow
from kronlink.registry.records import JobInfo
from kronlink.registry.versions import record_audit

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "claim_job",
    "claim_next_job",
    "create_job",
    "finish_job",
    "get_job",
    "heartbeat",
    "list_jobs",
    "recover_expired_jobs",
    "request_cancel",
    "update_progress",
]

DEFAULT_MAX_ATTEMPTS = 3


def _job_row(session: Session, job_id: int, *, for_update: bool = False) -> Job:
    return row_by_id(session, Job, job_id, "job", for_update=for_update)


def get_job(session: Session, job_id: int) -> JobInfo:
    return JobInfo.of(_job_row(session, job_id))


def list_jobs(
    session: Session, lineage: str | None = None, state: JobState | None = None
) -> list[JobInfo]:
    q = select(Job).order_by(Job.id)
    if lineage is not None:
        q = q.where(Job.lineage == lineage)
    if state is not None:
        q = q.where(Job.state == state)
    return [JobInfo.of(r) for r in session.scalars(q)]


def create_job(
    session: Session,
    *,
    lineage: str,
    payload: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    kind: str = "update",
    actor: str = "system",
    retry_ended: bool = False,
) -> tuple[JobInfo, bool]:
    """Queue a job; returns ``(job, created)``.

    With an ``idempotency_key`` already used, returns the existing job and
    ``created=False`` whatever its state: a redelivered submission does
    nothing. Concurrent submissions with one key get one row (the unique
    index decides; the loser reads the winner's row).

    ``retry_ended=True`` makes a job that failed or was cancelled not count:
    the new job gets the key ``<key>#<ended job id>``, so the same data can be
    submitted again after a full disk or a lost staging folder, while a
    submission repeated during a live or successful job still returns it. For
    keys kronlink derives from the data; a client's own key keeps the strict
    rule.
    """
    base = idempotency_key
    while idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is None:
            break
        if retry_ended and existing.state in (JobState.FAILED, JobState.CANCELLED):
            idempotency_key = f"{base}#{existing.id}"
            continue
        return JobInfo.of(existing), False
    lock_lineage(session, lineage)  # creates the lineage row; orders submissions
    row = Job(
        lineage=lineage,
        kind=kind,
        payload=dict(payload or {}),
        idempotency_key=idempotency_key,
        state=JobState.QUEUED,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is None:
            raise
        return JobInfo.of(existing), False
    record_audit(
        session,
        AuditAction.JOB_SUBMITTED,
        f"job:{row.id}",
        actor=actor,
        details={"lineage": lineage},
    )
    return JobInfo.of(row), True


def recover_expired_jobs(
    session: Session,
    *,
    lineage: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> list[JobInfo]:
    """Running jobs whose lease has expired: requeue them, or fail them once
    they have been claimed ``max_attempts`` times. Returns the changed jobs.

    A job that kills its worker every time (out of memory) thus ends failed
    after a bounded number of tries instead of looping forever.
    """
    if max_attempts < 1:
        raise ConfigError(f"max_attempts: expected >= 1, got {max_attempts}")
    now = now or utcnow()
    q = select(Job).where(Job.state == JobState.RUNNING, Job.lease_until < now)
    if lineage is not None:
        q = q.where(Job.lineage == lineage)
    changed = []
    for row in session.scalars(q.order_by(Job.id).with_for_update()).all():
        previous_owner = row.owner
        row.owner = None
        row.lease_until = None
        if row.attempts >= max_attempts:
            row.state = JobState.FAILED
            row.error = (
                f"lease expired {row.attempts} time(s) (worker lost); gave up after "
                f"{max_attempts} attempt(s)"
            )
            row.finished_at = now
            _clear_phase(row)
            action = AuditAction.JOB_FINISHED
        else:
            row.state = JobState.QUEUED
            action = AuditAction.JOB_REQUEUED
        session.flush()
        record_audit(
            session,
            action,
            f"job:{row.id}",
            details={
                "state": row.state.value,
                "attempts": row.attempts,
                "lost_owner": previous_owner,
            },
            at=now,
        )
        changed.append(JobInfo.of(row))
    return changed


def _start(row: Job, owner: str, lease_s: float, now: datetime) -> None:
    row.state = JobState.RUNNING
    row.owner = owner
    row.attempts += 1
    row.lease_until = now + timedelta(seconds=lease_s)
    row.heartbeat_at = now
    row.started_at = row.started_at or now


def _lineage_busy(session: Session, lineage: str) -> bool:
    running = select(Job.id).where(Job.lineage == lineage, Job.state == JobState.RUNNING)
    return session.scalar(running.limit(1)) is not None


def claim_next_job(
    session: Session,
    lineage: str,
    *,
    owner: str,
    lease_s: float,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> JobInfo | None:
    """Start the lineage's oldest queued job under a lease, or return None.

    None when the queue is empty or another job of the lineage is running
    (with a live lease): jobs of one lineage run one at a time, in submission
    order. Expired leases are recovered first. Takes the lineage lock.
    """
    now = now or utcnow()
    lock_lineage(session, lineage)
    recover_expired_jobs(session, lineage=lineage, max_attempts=max_attempts, now=now)
    if _lineage_busy(session, lineage):
        return None
    row = session.scalar(
        select(Job)
        .where(Job.lineage == lineage, Job.state == JobState.QUEUED)
        .order_by(Job.id)
        .limit(1)
    )
    if row is None:
        return None
    _start(row, owner, lease_s, now)
    session.flush()
    return JobInfo.of(row)


def claim_job(
    session: Session,
    job_id: int,
    *,
    owner: str,
    lease_s: float,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> JobInfo | None:
    """Start this job if it is the next in its lineage's order, else return None.

    For a worker that was handed one job id (a Celery delivery): None means
    "not yet" (an earlier job is queued or running: retry later) or "no
    longer" (the job is running elsewhere or finished: check with
    :func:`get_job`; a redelivered finished job does nothing).
    """
    now = now or utcnow()
    lineage = _job_row(session, job_id).lineage
    lock_lineage(session, lineage)
    recover_expired_jobs(session, lineage=lineage, max_attempts=max_attempts, now=now)
    row = _job_row(session, job_id)
    session.refresh(row)
    if row.state != JobState.QUEUED or _lineage_busy(session, lineage):
        return None
    head = session.scalar(
        select(Job.id)
        .where(Job.lineage == lineage, Job.state == JobState.QUEUED)
        .order_by(Job.id)
        .limit(1)
    )
    if head != job_id:
        return None
    _start(row, owner, lease_s, now)
    session.flush()
    return JobInfo.of(row)


def _held(session: Session, job_id: int, owner: str, now: datetime) -> Job:
    row = _job_row(session, job_id, for_update=True)
    if row.state != JobState.RUNNING or row.owner != owner:
        raise LeaseLostError(
            f"job {job_id}: expected running under {owner!r}, got {row.state.value}"
            f" under {row.owner!r}"
        )
    if row.lease_until is not None and row.lease_until < now:
        raise LeaseLostError(f"job {job_id}: lease expired at {row.lease_until.isoformat()}")
    return row


def heartbeat(
    session: Session,
    job_id: int,
    *,
    owner: str,
    lease_s: float,
    phase: str | None = None,
    progress: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> JobInfo:
    """Extend the lease (and optionally record progress). Raises
    :class:`LeaseLostError` when the job is no longer this owner's; the
    returned ``cancel_requested`` tells the training loop to stop."""
    now = now or utcnow()
    row = _held(session, job_id, owner, now)
    row.heartbeat_at = now
    row.lease_until = now + timedelta(seconds=lease_s)
    if phase is not None:
        row.phase = phase
    if progress is not None:
        row.progress = dict(progress)
    session.flush()
    return JobInfo.of(row)


def update_progress(
    session: Session,
    job_id: int,
    *,
    owner: str,
    phase: str | None = None,
    progress: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    now: datetime | None = None,
) -> JobInfo:
    """Record phase, progress (replaced) and phase timings (merged) without
    touching the lease."""
    row = _held(session, job_id, owner, now or utcnow())
    if phase is not None:
        row.phase = phase
    if progress is not None:
        row.progress = dict(progress)
    if timings is not None:
        row.timings = {**row.timings, **timings}
    session.flush()
    return JobInfo.of(row)


def _clear_phase(row: Job) -> None:
    """A finished job is in no phase: the last one it reached moves to
    ``progress["ended_in"]`` (where a failure happened)."""
    if row.phase is not None:
        row.progress = {**(row.progress or {}), "ended_in": row.phase}
    row.phase = None


def request_cancel(session: Session, job_id: int, *, actor: str = "system") -> JobInfo:
    """A queued job is cancelled at once; a running one gets ``cancel_requested``
    (the worker stops at its next check); a finished one is left as it is."""
    row = _job_row(session, job_id, for_update=True)
    if row.state in FINISHED_JOB_STATES:
        return JobInfo.of(row)
    if row.state == JobState.QUEUED:
        row.state = JobState.CANCELLED
        row.finished_at = utcnow()
        _clear_phase(row)
    row.cancel_requested = True
    session.flush()
    record_audit(
        session,
        AuditAction.JOB_CANCEL_REQUESTED,
        f"job:{row.id}",
        actor=actor,
        details={"state": row.state.value},
    )
    return JobInfo.of(row)


def finish_job(
    session: Session,
    job_id: int,
    state: JobState,
    *,
    owner: str,
    error: str | None = None,
    timings: Mapping[str, float] | None = None,
    now: datetime | None = None,
) -> JobInfo:
    """End a running job held by ``owner``: succeeded, failed or cancelled."""
    state = JobState(state)
    if state not in FINISHED_JOB_STATES:
        raise InvalidTransitionError(
            f"finish_job: expected succeeded, failed or cancelled, got {state.value}"
        )
    now = now or utcnow()
    row = _held(session, job_id, owner, now)
    row.state = state
    row.error = error
    row.finished_at = now
    row.lease_until = None
    _clear_phase(row)
    if timings is not None:
        row.timings = {**row.timings, **timings}
    session.flush()
    record_audit(
        session,
        AuditAction.JOB_FINISHED,
        f"job:{row.id}",
        details={"state": state.value, "attempts": row.attempts},
        at=now,
    )
    return JobInfo.of(row)
