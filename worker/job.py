"""The update job's body: a plain function, testable without a broker.

    outcome = run_job(context, job_id)

Phases: claim (lease) -> validate the staged dataset -> load the active
version and every prior task's state (checksums verified) -> ``run_update``
-> write artifacts -> one transaction: version, task states, activation if
the gate passes, job finished, audit rows. The steps are the methods of
:class:`worker.steps.UpdateSteps`; this module claims, runs them, commits
(retried through a database blip, so a trained model is not thrown away)
and ends the job. The staged data is deleted in every ending; docs/worker.md
lists the guarantees and how each is enforced.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateJobSpec
from kronlink.errors import DataFormatError, KronlinkError
from kronlink.notices import publish, publishes
from kronlink.registry import (
    ArtifactStore,
    JobInfo,
    JobState,
    LeaseLostError,
    claim_job,
    finish_job,
    get_job,
    lineage_transaction,
)
from kronlink.settings import Settings
from worker._run import Ending, Run
from worker.cleanup import audit_deleted, delete_leftover, delete_staged, redact
from worker.steps import UpdateSteps

__all__ = [
    "JobContext",
    "Outcome",
    "delete_leftover",
    "delete_staged",
    "redact",
    "run_job",
    "scratch_name",
]

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    NOT_READY = "not_ready"  # an earlier job of the lineage is ahead: retry later
    SKIPPED = "skipped"  # finished already or running elsewhere: a redelivery
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the lease expired under us; the job is someone else's now


@dataclass
class JobContext:
    """What a job needs from its process: passed in, so tests swap any part."""

    settings: Settings
    factory: sessionmaker[Session]
    store: ArtifactStore
    owner: str
    update_fn: Callable[..., Any] | None = None  # None: kronlink.update.run_update


# Errors of a database that is restarting or failing over: the commit is retried.
_TRANSIENT = (OperationalError, InterfaceError, PoolTimeoutError)


def scratch_name(job: JobInfo) -> str:
    """The attempt's scratch folder under ``settings.scratch_path``; the sweep
    deletes any whose attempt is not running (worker.sweep.sweep_scratch)."""
    return f"job-{job.id}-a{job.attempts}"


def run_job(ctx: JobContext, job_id: int) -> Outcome:
    """Run update job ``job_id`` to its end. Safe to call again for the same job."""
    settings = ctx.settings
    with ctx.factory.begin() as s:
        job = get_job(s, job_id)
    if job.finished:
        log.info("job %s is already %s: nothing to do", job_id, job.state.value)
        delete_leftover(ctx, job)
        return Outcome.SKIPPED
    with lineage_transaction(ctx.factory, job.lineage) as s:
        claimed = claim_job(
            s, job_id, owner=ctx.owner, lease_s=settings.lease_s, max_attempts=settings.max_attempts
        )
    if claimed is None:
        with ctx.factory.begin() as s:
            job = get_job(s, job_id)
        if job.state == JobState.QUEUED:
            return Outcome.NOT_READY
        if job.finished:  # cancelled while queued, or failed by the lease recovery
            delete_leftover(ctx, job)
        return Outcome.SKIPPED

    run: Run | None = None
    steps: UpdateSteps | None = None
    ending = Ending(JobState.FAILED, "job ended before it began")
    staged: Path | None = None
    scratch = settings.scratch_path / scratch_name(claimed)
    done = threading.Event()
    try:
        spec = UpdateJobSpec.model_validate(claimed.payload)
        staged = settings.staging_path / spec.staged_id
        run = Run(ctx, claimed, spec, staged)
        beater = threading.Thread(target=run.heartbeat_loop, args=(done,), daemon=True)
        beater.start()
        scratch.mkdir(parents=True, exist_ok=True)
        steps = UpdateSteps(run, scratch)
        steps.validate()
        steps.load()
        steps.tune_retriever()
        steps.candidates()
        steps.update()
        steps.write()
        log.info(
            "job %s: %s (%d prior task(s)) ready to commit, tasks %s",
            job_id,
            steps.method,
            len(steps.priors),
            [*steps.prior_names, spec.task_name],
        )
        ending = Ending(JobState.SUCCEEDED, None)
    except Ending as e:
        ending = e
    except DataFormatError as e:
        ending = Ending(JobState.FAILED, f"invalid dataset: {redact(e, staged)}")
    except KronlinkError as e:
        ending = Ending(JobState.FAILED, f"{type(e).__name__}: {e}")
    except Exception as e:
        log.exception("job %s crashed", job_id)
        ending = Ending(JobState.FAILED, f"internal error ({type(e).__name__}): {e}")
    except BaseException:
        done.set()
        if steps is not None:
            steps.discard()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    committing = steps if ending.state is JobState.SUCCEEDED else None
    if committing is None and steps is not None:
        steps.discard()
    try:
        if run is not None and run.lost.is_set():
            # The job is someone else's now (requeued by the sweep): its staged
            # data is theirs to read, and the ending that deletes it is theirs.
            if committing is not None:
                committing.discard()
            log.warning("job %s: lease lost; leaving the job and its data to the new owner", job_id)
            return Outcome.LOST
        timings = run.timings if run is not None else {}
        ending = _commit(ctx, claimed, committing, ending, timings)
    except LeaseLostError:
        # Lost between the last heartbeat and the commit: the job and its data
        # are the new owner's, as above.
        return Outcome.LOST
    finally:
        done.set()  # the heartbeat kept the lease through the commit's retries
    # Deleted only once the ending is committed: a worker killed before that
    # leaves the job running, and its next attempt needs the data. A kill
    # between the commit and this line leaves the folder of a finished job,
    # which the sweep deletes at once (sweep_staged).
    if staged is not None:
        audit_deleted(ctx, claimed, delete_staged(staged), ending.state.value)
    # replicas swap now rather than at their next registry poll
    activated = run.activated if run is not None else None
    if ending.state is JobState.SUCCEEDED and activated is not None and publishes(settings.broker):
        publish(settings.broker, claimed.lineage, activated)
    return Outcome(ending.state.value)


def _commit(
    ctx: JobContext,
    job: JobInfo,
    steps: UpdateSteps | None,
    ending: Ending,
    timings: dict[str, float],
) -> Ending:
    """The ending's transaction (with the new version when ``steps`` is given),
    retried with backoff while the database is unreachable, for at most
    ``commit_retry_s``: a blip must not throw a trained model away. Anything
    else, or a database still gone after that, fails the job (if it can be
    recorded) and removes the artifacts."""
    deadline = time.monotonic() + ctx.settings.commit_retry_s
    delay = 0.2
    tries = 0
    while True:
        tries += 1
        try:
            return _commit_once(ctx, job, steps, ending, timings)
        except _TRANSIENT as e:
            if isinstance(e, DBAPIError) and not _transient(e):
                error: Exception = e
            elif time.monotonic() + delay < deadline:
                log.warning(
                    "job %s: commit attempt %d failed (%s); retrying in %.1f s",
                    job.id,
                    tries,
                    str(e).splitlines()[0][:200],
                    delay,
                )
                time.sleep(delay)  # backoff between tries, not synchronisation
                delay = min(delay * 2, 10.0)
                continue
            else:
                error = e
        except Ending as e:  # the commit found a reason to fail the job
            if steps is not None:
                steps.discard()
            return _commit_once(ctx, job, None, e, timings)
        except LeaseLostError:
            if steps is not None:
                steps.discard()
            raise
        except Exception as e:
            if steps is None:
                raise
            error = e
        if steps is None:
            raise error
        log.error("job %s: commit failed after %d tries: %s", job.id, tries, error)
        steps.discard()
        failed = Ending(JobState.FAILED, f"commit failed ({type(error).__name__}): {error}")
        return _commit_once(ctx, job, None, failed, timings)


def _transient(e: DBAPIError) -> bool:
    # OperationalError also covers SQL a retry cannot fix; a lost connection or
    # a locked SQLite file are the ones that pass
    return bool(e.connection_invalidated) or isinstance(e, OperationalError)


def _commit_once(
    ctx: JobContext,
    job: JobInfo,
    steps: UpdateSteps | None,
    ending: Ending,
    timings: dict[str, float],
) -> Ending:
    with lineage_transaction(ctx.factory, job.lineage) as s:
        if steps is not None:
            ending = steps.commit(s) or ending
        finish_job(s, job.id, ending.state, owner=ctx.owner, error=ending.error, timings=timings)
    return ending
