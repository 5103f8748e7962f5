"""Jobs: idempotent submission, claim order, leases, cancel, expired-lease recovery."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import (
    AuditAction,
    JobState,
    LeaseLostError,
    claim_job,
    claim_next_job,
    create_job,
    finish_job,
    get_job,
    heartbeat,
    lineage_transaction,
    list_audit,
    recover_expired_jobs,
    request_cancel,
    update_progress,
)
from kronlink.registry.models import utcnow

LEASE_S = 60


def test_create_job_is_idempotent_on_its_key(session: Session) -> None:
    job, created = create_job(
        session, lineage="main", payload={"task": "hpo"}, idempotency_key="k1"
    )
    again, created_again = create_job(session, lineage="main", idempotency_key="k1")
    session.commit()
    assert created and not created_again and again.id == job.id
    assert again.payload == {"task": "hpo"} and again.state == JobState.QUEUED
    other, _ = create_job(session, lineage="main", idempotency_key="k2")
    assert other.id != job.id
    assert len(list_audit(session, action=AuditAction.JOB_SUBMITTED)) == 2


def test_a_derived_key_lets_ended_jobs_be_submitted_again(session: Session) -> None:
    failed, _ = create_job(session, lineage="main", idempotency_key="d", retry_ended=True)
    claim_job(session, failed.id, owner="w", lease_s=LEASE_S)
    finish_job(session, failed.id, JobState.FAILED, owner="w", error="disk full")
    # the strict rule: the failed job is the answer
    strict, created = create_job(session, lineage="main", idempotency_key="d")
    assert strict.id == failed.id and not created
    retry, created = create_job(session, lineage="main", idempotency_key="d", retry_ended=True)
    assert created and retry.id != failed.id and retry.idempotency_key == f"d#{failed.id}"
    # while the retry is live, submitting again returns it
    again, created = create_job(session, lineage="main", idempotency_key="d", retry_ended=True)
    assert again.id == retry.id and not created
    claim_job(session, retry.id, owner="w", lease_s=LEASE_S)
    finish_job(session, retry.id, JobState.CANCELLED, owner="w")
    third, created = create_job(session, lineage="main", idempotency_key="d", retry_ended=True)
    assert created and third.idempotency_key == f"d#{retry.id}"
    session.commit()


def test_claims_follow_submission_order_one_at_a_time(session: Session) -> None:
    j1, _ = create_job(session, lineage="main")
    j2, _ = create_job(session, lineage="main")
    j3, _ = create_job(session, lineage="other")
    session.commit()
    # j2 is not next in line while j1 is queued.
    assert claim_job(session, j2.id, owner="w1", lease_s=LEASE_S) is None
    got = claim_next_job(session, "main", owner="w1", lease_s=LEASE_S)
    assert got.id == j1.id and got.state == JobState.RUNNING and got.attempts == 1
    assert got.lease_until > utcnow()
    # j1 runs: nothing else of that lineage may start; another lineage may.
    assert claim_next_job(session, "main", owner="w2", lease_s=LEASE_S) is None
    assert claim_job(session, j3.id, owner="w2", lease_s=LEASE_S).id == j3.id
    finish_job(session, j1.id, JobState.SUCCEEDED, owner="w1", timings={"train": 1.5})
    assert claim_job(session, j2.id, owner="w2", lease_s=LEASE_S).id == j2.id
    # A redelivered, finished job is not claimed again.
    assert claim_job(session, j1.id, owner="w3", lease_s=LEASE_S) is None
    session.commit()
    done = get_job(session, j1.id)
    assert done.finished and done.timings == {"train": 1.5} and done.lease_until is None


def test_heartbeat_progress_and_lease_ownership(session: Session) -> None:
    job, _ = create_job(session, lineage="main")
    t0 = utcnow()
    claim_next_job(session, "main", owner="w1", lease_s=LEASE_S, now=t0)
    later = t0 + timedelta(seconds=50)
    beat = heartbeat(
        session,
        job.id,
        owner="w1",
        lease_s=LEASE_S,
        phase="train",
        progress={"epoch": 1},
        now=later,
    )
    assert beat.lease_until == later + timedelta(seconds=LEASE_S)
    info = update_progress(
        session, job.id, owner="w1", progress={"epoch": 2, "step": 7}, timings={"validate": 0.25}
    )
    assert (info.phase, info.progress, info.timings) == (
        "train",
        {"epoch": 2, "step": 7},
        {"validate": 0.25},
    )
    with pytest.raises(LeaseLostError, match="under 'w1'"):
        heartbeat(session, job.id, owner="intruder", lease_s=LEASE_S)
    with pytest.raises(LeaseLostError, match="lease expired"):
        heartbeat(session, job.id, owner="w1", lease_s=LEASE_S, now=later + timedelta(hours=1))


def test_cancel_queued_and_running(session: Session) -> None:
    queued, _ = create_job(session, lineage="a")
    assert request_cancel(session, queued.id).state == JobState.CANCELLED
    running, _ = create_job(session, lineage="b")
    claim_next_job(session, "b", owner="w", lease_s=LEASE_S)
    flagged = request_cancel(session, running.id, actor="admin")
    assert flagged.state == JobState.RUNNING and flagged.cancel_requested
    assert heartbeat(session, running.id, owner="w", lease_s=LEASE_S).cancel_requested
    finish_job(session, running.id, JobState.CANCELLED, owner="w")
    assert request_cancel(session, running.id).state == JobState.CANCELLED


def test_expired_leases_are_requeued_then_failed_after_the_bound(session: Session) -> None:
    """A worker that dies stops heart-beating; its job must not stay running."""
    job, _ = create_job(session, lineage="main")
    t = utcnow()
    for attempt in (1, 2):
        got = claim_next_job(
            session, "main", owner=f"w{attempt}", lease_s=LEASE_S, max_attempts=2, now=t
        )
        assert got.id == job.id and got.attempts == attempt
        t += timedelta(seconds=LEASE_S + 1)  # the worker died: the lease runs out
        assert (
            recover_expired_jobs(session, max_attempts=2, now=t - timedelta(seconds=LEASE_S + 2))
            == []
        )
    [failed] = recover_expired_jobs(session, max_attempts=2, now=t)
    assert failed.state == JobState.FAILED and "gave up after 2 attempt(s)" in failed.error
    session.commit()
    assert claim_next_job(session, "main", owner="w3", lease_s=LEASE_S, now=t) is None
    # The dead worker's late report is refused.
    with pytest.raises(LeaseLostError):
        finish_job(session, job.id, JobState.SUCCEEDED, owner="w2", now=t)
    actions = [a.action for a in list_audit(session, subject=f"job:{job.id}")]
    assert actions == ["job_submitted", "job_requeued", "job_finished"]


def test_lineage_transaction_serialises_claims(factory: sessionmaker[Session]) -> None:
    """Two workers race for one lineage's queue: each job is claimed exactly once."""
    with factory.begin() as s:
        ids = [create_job(s, lineage="main")[0].id for _ in range(2)]
    claimed: list[int] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        barrier.wait()
        with lineage_transaction(factory, "main") as s:
            job = claim_next_job(s, "main", owner=name, lease_s=LEASE_S)
            if job is not None:
                claimed.append(job.id)
                finish_job(s, job.id, JobState.SUCCEEDED, owner=name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == ids  # both ran, in order, neither twice
    assert claimed == ids
