"""The update job's body: a plain function, testable without a broker.

    outcome = run_job(context, job_id)

Phases: claim (lease) -> validate the staged dataset -> load the active
version and every prior task's state (checksums verified) -> ``run_update``
-> write artifacts -> one transaction: version, task states, activation if
the gate passes, job finished, audit rows. The staged data is deleted in every
ending; docs/worker.md lists the guarantees and how each is enforced.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateJobSpec
from kronlink.data.io import ONTOLOGY_FILE
from kronlink.errors import DataFormatError, KronlinkError
from kronlink.notices import publish, publishes
from kronlink.registry import (
    ArtifactInfo,
    ArtifactStore,
    AuditAction,
    JobInfo,
    JobState,
    LeaseLostError,
    NotFoundError,
    activate_version,
    active_version,
    add_task_state,
    claim_job,
    create_ontology,
    create_task,
    create_version,
    finish_job,
    get_job,
    get_ontology,
    get_task,
    heartbeat,
    lineage_transaction,
    list_ontologies,
    list_task_states,
    mark_version_failed,
    record_audit,
    update_progress,
)
from kronlink.settings import Settings

__all__ = ["JobContext", "Outcome", "delete_leftover", "delete_staged", "redact", "run_job"]

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


class _Ending(Exception):
    """Ends the job early with a state and an error message."""

    def __init__(self, state: JobState, error: str | None) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


@dataclass
class _Run:
    """One claimed job while it runs."""

    ctx: JobContext
    job: JobInfo
    spec: UpdateJobSpec
    staged: Path
    timings: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    activated: int | None = None  # the version the commit activated, for the notice
    _last_progress: float = 0.0
    _phase: str | None = None

    # -- job-row reports ----------------------------------------------------
    def set_phase(self, phase: str) -> None:
        self._phase = phase
        self._write(phase=phase, progress={"message": f"{phase} started"})

    def on_progress(self, p: Any) -> None:
        """Throttled: at most one write per ``progress_interval_s``, and every phase change."""
        now = time.monotonic()
        changed = p.phase != self._phase
        if not changed and now - self._last_progress < self.ctx.settings.progress_interval_s:
            return
        self._phase = p.phase
        self._last_progress = now
        progress = {
            k: getattr(p, k)
            for k in ("epoch", "step", "total_steps", "loss", "penalty", "dev_accuracy", "message")
        }
        self._write(phase=p.phase, progress=progress)

    def _write(self, **kw: Any) -> None:
        try:
            with self.ctx.factory.begin() as s:
                update_progress(s, self.job.id, owner=self.ctx.owner, **kw)
        except LeaseLostError:
            self.lost.set()
            self.stop.set()
        except Exception as exc:
            # A database hiccup (PostgreSQL restarting) must not end a training
            # run that is fine: progress is a report, the commit is what counts,
            # and the heartbeat keeps the lease meanwhile (or loses it, above).
            log.warning(
                "job %s: progress not recorded (%s: %s)",
                self.job.id,
                type(exc).__name__,
                str(exc).splitlines()[0][:200],
            )

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def check(self) -> None:
        """Between phases: end the job if it was cancelled or its lease was lost."""
        if self.lost.is_set():
            raise _Ending(JobState.FAILED, "lease lost")
        if self.cancel.is_set():
            raise _Ending(JobState.CANCELLED, "cancelled on request")

    # -- heartbeat thread ----------------------------------------------------
    def heartbeat_loop(self, done: threading.Event) -> None:
        """Extend the lease every ``lease_s / 4`` and pick up a cancel request."""
        while not done.wait(self.ctx.settings.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        try:
            with self.ctx.factory.begin() as s:
                info = heartbeat(
                    s, self.job.id, owner=self.ctx.owner, lease_s=self.ctx.settings.lease_s
                )
        except LeaseLostError:
            self.lost.set()
            self.stop.set()
            return
        except Exception:  # a database hiccup: the next beat retries
            log.warning("job %s: heartbeat failed", self.job.id, exc_info=True)
            return
        if info.cancel_requested:
            self.cancel.set()
            self.stop.set()


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

    run: _Run | None = None
    ending = _Ending(JobState.FAILED, "job ended before it began")
    commit: Callable[[Session], None] | None = None
    written: list[str] = []
    staged: Path | None = None
    done = threading.Event()
    try:
        spec = UpdateJobSpec.model_validate(claimed.payload)
        staged = settings.staging_path / spec.staged_id
        run = _Run(ctx, claimed, spec, staged)
        beater = threading.Thread(target=run.heartbeat_loop, args=(done,), daemon=True)
        beater.start()
        commit, written = _execute(run)
        ending = _Ending(JobState.SUCCEEDED, None)
    except _Ending as e:
        ending = e
    except DataFormatError as e:
        ending = _Ending(JobState.FAILED, f"invalid dataset: {redact(e, staged)}")
    except KronlinkError as e:
        ending = _Ending(JobState.FAILED, f"{type(e).__name__}: {e}")
    except Exception as e:
        log.exception("job %s crashed", job_id)
        ending = _Ending(JobState.FAILED, f"internal error ({type(e).__name__}): {e}")
    finally:
        done.set()
    if run is not None and run.lost.is_set():
        # The job is someone else's now (requeued by the sweep): its staged
        # data is theirs to read, and the ending that deletes it is theirs.
        _discard(ctx.store, written)
        log.warning("job %s: lease lost; leaving the job and its data to the new owner", job_id)
        return Outcome.LOST
    timings = run.timings if run is not None else {}
    try:
        with lineage_transaction(ctx.factory, claimed.lineage) as s:
            if commit is not None:
                ending = commit(s) or ending
            finish_job(
                s, job_id, ending.state, owner=ctx.owner, error=ending.error, timings=timings
            )
    except LeaseLostError:
        # Lost between the last heartbeat and the commit: the job and its data
        # are the new owner's, as above.
        _discard(ctx.store, written)
        return Outcome.LOST
    except Exception as e:
        if commit is None:
            raise
        log.exception("job %s: commit failed", job_id)
        _discard(ctx.store, written)
        ending = _Ending(JobState.FAILED, f"commit failed ({type(e).__name__}): {e}")
        with lineage_transaction(ctx.factory, claimed.lineage) as s:
            finish_job(
                s, job_id, ending.state, owner=ctx.owner, error=ending.error, timings=timings
            )
    # Deleted only once the ending is committed: a worker killed before that
    # leaves the job running, and its next attempt needs the data. A kill
    # between the commit and this line leaves the folder of a finished job,
    # which the sweep deletes at once (sweep_staged).
    if staged is not None:
        _audit_deleted(ctx, claimed, delete_staged(staged), ending.state.value)
    # replicas swap now rather than at their next registry poll
    activated = run.activated if run is not None else None
    if ending.state is JobState.SUCCEEDED and activated is not None and publishes(settings.broker):
        publish(settings.broker, claimed.lineage, activated)
    return Outcome(ending.state.value)


_QUOTED = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")


def redact(error: DataFormatError, staged: Path | None) -> str:
    """The error for the job row, without any text of the dataset.

    Validation messages quote what they found (a split name, a gold id); the
    job row outlives the data, so quoted values are replaced and the file is
    named relative to the staged folder. The uploader saw the full message
    when the service validated the upload.
    """
    path = error.path
    if path is not None and staged is not None:
        try:
            path = Path(path).resolve().relative_to(staged.resolve()).as_posix()
        except ValueError:
            path = Path(path).name
    where = [p for p in (path, error.line and f"line {error.line}") if p]
    if error.field:
        where.append(f"field {error.field}")
    detail = _QUOTED.sub("<value withheld>", error.detail)
    return f"{', '.join(where)}: {detail}" if where else detail


def _audit_deleted(ctx: JobContext, job: JobInfo, deleted: dict[str, int], ending: str) -> None:
    with ctx.factory.begin() as s:
        record_audit(
            s,
            AuditAction.DATA_DELETED,
            f"job:{job.id}",
            actor=ctx.owner,
            details={**deleted, "ending": ending},
        )


def delete_leftover(ctx: JobContext, job: JobInfo) -> None:
    """A finished job whose staged data is still there (cancelled while queued,
    or failed by the lease recovery after its worker died)."""
    staged_id = job.payload.get("staged_id")
    if not isinstance(staged_id, str) or "/" in staged_id or not staged_id:
        return
    path = ctx.settings.staging_path / staged_id
    if path.exists():
        _audit_deleted(ctx, job, delete_staged(path), job.state.value)


def delete_staged(path: Path) -> dict[str, int]:
    """Remove a staged dataset folder; returns how many files and bytes went."""
    files = size = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file():
                files += 1
                size += p.stat().st_size
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        files, size = 1, path.stat().st_size
        path.unlink(missing_ok=True)
    return {"files": files, "bytes": size}


def _discard(store: ArtifactStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            log.warning("could not delete artifact %s", key, exc_info=True)


def _write_error(store: ArtifactStore, key: str, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    where = f"; at {exc.filename}" if exc.filename else ""
    return (
        f"cannot write artifact {key} to the artifact folder {store.root_url}: "
        f"[Errno {exc.errno}] {code} {exc.strerror or exc}{where}; nothing was committed "
        "and the active version is unchanged: free space or make the folder writable, "
        "then submit a new job"
    )


def _timed(run: _Run, phase: str):
    class _T:
        def __enter__(self) -> None:
            run.check()
            run.set_phase(phase)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            run.timings[phase] = round(time.perf_counter() - self.t0, 4)

    return _T()


def _execute(run: _Run) -> tuple[Callable[[Session], _Ending | None], list[str]]:
    """Everything between claim and commit; returns the commit step and the keys written."""
    from kronlink.curvature.state import TaskState
    from kronlink.data.io import load_task
    from kronlink.models import build_ranker, load_ranker
    from kronlink.training import TrainConfig
    from kronlink.update import UpdateRequest, run_update

    ctx, spec, job = run.ctx, run.spec, run.job
    store = ctx.store

    onto_name = spec.ontology or spec.task_name
    with _timed(run, "validate"):
        if not run.staged.is_dir():
            raise _Ending(
                JobState.FAILED,
                f"staged dataset {spec.staged_id} is missing (deleted by the sweep after "
                f"{ctx.settings.staged_max_age_s:g} s, or never staged)",
            )
        task = load_task(run.staged, max_bytes=ctx.settings.max_upload_bytes)
        unknown = set(spec.train) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise _Ending(JobState.FAILED, f"unknown train option(s): {', '.join(sorted(unknown))}")
        train = TrainConfig(**spec.train)
        lambdas = tuple(spec.lambdas) if isinstance(spec.lambdas, list) else spec.lambdas

    with _timed(run, "load"), ctx.factory.begin() as s:
        parent = active_version(s, job.lineage)
        prior_rows = list_task_states(s, parent.id) if parent is not None else []
        prior_names = [get_task(s, r.task_id).name for r in prior_rows]
        if spec.task_name in prior_names:
            raise _Ending(
                JobState.FAILED,
                f"task {spec.task_name!r} is already learned by version "
                f"{parent.number if parent else '?'} of lineage {job.lineage!r}",
            )
        scratch = Path(tempfile.mkdtemp(prefix="kronlink-job-"))
        try:
            if parent is None:  # bootstrap: version 1 learns its task from scratch
                ranker = dict(spec.ranker)
                model = build_ranker(ranker.pop("kind", "cnn"), **ranker)
                priors: list[TaskState] = []
                method = "none"
            else:
                path = store.get(
                    store.key_of(parent.artifact.uri), parent.artifact.sha256, scratch / "model"
                )
                model = load_ranker(path)
                priors = []
                for i, r in enumerate(prior_rows):
                    p = store.get(
                        store.key_of(r.artifact.uri), r.artifact.sha256, scratch / f"prior{i}"
                    )
                    priors.append(TaskState.load(p, model=model))
                method = spec.method
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    try:
        run.check()
        request = UpdateRequest(
            method=method,
            lambdas=0.0 if method == "none" else lambdas,
            half_decades=spec.half_decades,
            train=train,
            quality_gate=spec.quality_gate,
        )
        update = ctx.update_fn or run_update
        t0 = time.perf_counter()
        result = update(
            model, priors, task, request, on_progress=run.on_progress, should_stop=run.should_stop
        )
        run.timings["update"] = round(time.perf_counter() - t0, 4)
        run.timings.update({f"update.{k}": round(v, 4) for k, v in result.timings.items()})
        if result.stopped or result.new_state is None:
            run.check()
            raise _Ending(JobState.FAILED, "the update stopped without a result")
        run.check()  # a cancel that arrived after the last step still counts

        with _timed(run, "write"):
            attempt = f"j{job.id}-a{job.attempts}"
            vkey = f"versions/{job.lineage}/{attempt}"
            skey = f"states/{job.lineage}/{attempt}/{spec.task_name}"
            written: list[str] = []
            result.model.save(scratch / "out-model")
            result.new_state.save(
                scratch / "out-state.safetensors", dtype=request.state_torch_dtype
            )
            with ctx.factory.begin() as s:
                known = {o.name for o in list_ontologies(s)}
            try:
                written.append(vkey)
                model_art = store.put_dir(vkey, scratch / "out-model")
                written.append(skey)
                state_art = store.put_file(skey, scratch / "out-state.safetensors")
                onto_art = None
                if onto_name not in known:  # kept for the service's candidate generation
                    okey = f"ontologies/{onto_name}/{attempt}"
                    written.append(okey)
                    onto_art = store.put_file(okey, run.staged / ONTOLOGY_FILE)
            except OSError as e:  # a full or read-only artifact folder: say which, and why
                raise _Ending(JobState.FAILED, _write_error(store, written[-1], e)) from e
    except BaseException:
        if "written" in locals():
            _discard(store, written)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    names = [*prior_names, spec.task_name]
    summary = result.summary()
    metrics = {
        "test": summary["test"],
        "dev": summary["dev"],
        "gate_passed": result.gate_passed,
        "quality_gate": spec.quality_gate,
        "predicted_forgetting": dict(zip(prior_names, result.predicted_forgetting, strict=False)),
        "selection": summary["selection"],
        "timings": summary["timings"],
    }
    lambdas_by_task = dict(zip(prior_names, result.lambdas, strict=False))
    sizes = {
        "concepts": len(task.concepts),
        **{sp: len(task.split(sp)) for sp in ("train", "dev", "test")},
    }
    parent_id = parent.id if parent is not None else None

    def commit(s: Session) -> _Ending | None:
        now_active = active_version(s, job.lineage)
        if (now_active.id if now_active else None) != parent_id:
            raise _Ending(
                JobState.FAILED,
                f"the active version of {job.lineage!r} changed while the job ran "
                f"(anchored on {parent_id}, now {now_active.id if now_active else None}); resubmit",
            )
        task_id = _task_id(s, spec, sizes, onto_art)
        v = create_version(
            s,
            lineage=job.lineage,
            method=method,
            artifact=model_art,
            parent_id=parent_id,
            task_id=task_id,
            lambdas=lambdas_by_task,
            metrics=metrics,
            job_id=job.id,
            actor=ctx.owner,
        )
        for r in prior_rows:
            add_task_state(s, v.id, r.task_id, r.artifact)
        add_task_state(s, v.id, task_id, state_art)
        if result.gate_passed:
            activate_version(s, v.id, actor=ctx.owner, reason=f"job {job.id}")
            run.activated = v.id
            return None
        error = f"quality gate failed: test accuracy {summary['test'] and summary['test']['accuracy']} < {spec.quality_gate}"
        mark_version_failed(s, v.id, error=error, actor=ctx.owner)
        return _Ending(JobState.FAILED, f"{error}; version {v.number} kept as failed")

    log.info(
        "job %s: %s (%d prior task(s)) ready to commit, tasks %s",
        job.id,
        method,
        len(priors),
        names,
    )
    return commit, written


def _task_id(
    s: Session, spec: UpdateJobSpec, sizes: dict[str, int], onto_art: ArtifactInfo | None
) -> int:
    try:
        return get_task(s, spec.task_name).id
    except NotFoundError:
        pass
    onto_name = spec.ontology or spec.task_name
    try:
        onto = get_ontology(s, onto_name)
    except NotFoundError:
        onto = create_ontology(
            s, onto_name, concept_count=sizes["concepts"], source="upload", artifact=onto_art
        )
    return create_task(s, spec.task_name, ontology_id=onto.id, sizes=sizes).id
