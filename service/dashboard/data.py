"""What the dashboard shows, read from the registry as plain values.

Nothing here renders: :func:`lineage_view` and :func:`jobs_view` turn registry
records into frozen dataclasses (and JSON) that the templates, the SVG chart
and the polling endpoint share. Every text in them may come from an upload
(task and ontology names, job errors): the renderers escape, this module
never builds markup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kronlink.registry import (
    AuditAction,
    JobInfo,
    VersionInfo,
    VersionState,
    list_audit,
    list_ontologies,
    list_task_states,
    list_tasks,
    list_versions,
)
from kronlink.registry.models import Job, ModelVersion

__all__ = [
    "Activation",
    "Baseline",
    "Cell",
    "JobRow",
    "LineageView",
    "Storage",
    "TaskRow",
    "VersionRow",
    "fingerprint",
    "jobs_view",
    "lineage_names",
    "lineage_view",
]

RECENT_JOBS = 20  # finished jobs listed under the running and queued ones


@dataclass(frozen=True)
class Baseline:
    """A baseline's test-split figures recorded with a version (BM25, the retriever)."""

    name: str
    accuracy: float | None
    recall_at_10: float | None


@dataclass(frozen=True)
class Activation:
    """One promotion or rollback from the audit log: who, when, why."""

    at: datetime
    action: str  # promoted | rolled_back
    version: int  # number
    previous: int | None  # number of the version it replaced
    actor: str
    reason: str | None


@dataclass(frozen=True)
class Storage:
    """What the lineage's versions keep in the artifact store, each file counted
    once: ``total`` is the sum of the three parts and of the versions' ``new_bytes``
    plus the ontologies."""

    models: int
    task_states: int
    ontologies: int

    @property
    def total(self) -> int:
        return self.models + self.task_states + self.ontologies


@dataclass(frozen=True)
class VersionRow:
    """One model version on the timeline."""

    id: int
    number: int
    state: str
    parent_number: int | None
    task: str | None  # the task this version added
    method: str
    lambdas: dict[str, Any]  # per prior task name
    created_at: datetime
    activated_at: datetime | None
    job_id: int | None
    model_bytes: int
    state_bytes: int  # every task state this version carries
    new_bytes: int  # what this version added to the store (model + its new task state)
    test_accuracy: float | None
    error: str | None
    carries: tuple[str, ...] = ()  # names of the tasks it was trained to keep
    baselines: tuple[Baseline, ...] = ()  # the test split's baselines, when recorded
    ranker: str | None = None  # the ranker's kind, when the worker recorded it
    retriever: str | None = None  # what the version's retriever is (_retriever)
    confidence: str | None = None  # whose calibration each ontology is answered with

    @property
    def active(self) -> bool:
        return self.state == VersionState.ACTIVE.value

    @property
    def can_activate(self) -> bool:
        # Failed versions never serve; the active one is active already.
        return self.state in (VersionState.RETIRED.value, VersionState.CANDIDATE.value)


@dataclass(frozen=True)
class Cell:
    """One task x version cell: the accuracy when learned, or the predicted
    forgetting Ω at a later version (a data-free estimate of the loss increase)."""

    kind: str  # "learned" | "forgetting" | "none" (no value recorded)
    value: float | None = None


@dataclass(frozen=True)
class TaskRow:
    """A task as learned by one version (a task resubmitted after a failed
    version has a row per attempt)."""

    name: str
    learned_by: int  # version number
    cells: tuple[Cell | None, ...]  # one per version; None before the task was learned


@dataclass(frozen=True)
class LineageView:
    lineage: str
    versions: tuple[VersionRow, ...]
    tasks: tuple[TaskRow, ...]
    fingerprint: str  # changes whenever a version is added or changes state
    history: tuple[Activation, ...] = ()  # newest first
    storage: Storage = Storage(0, 0, 0)

    @property
    def active(self) -> VersionRow | None:
        return next((v for v in self.versions if v.active), None)

    @property
    def max_forgetting(self) -> float:
        values = [c.value for t in self.tasks for c in t.cells if c and c.kind == "forgetting"]
        return max((v for v in values if v is not None), default=0.0)


@dataclass(frozen=True)
class JobRow:
    """A job as the dashboard lists it: ids, state and progress, never payload data."""

    id: int
    lineage: str
    task: str | None
    method: str | None
    state: str
    phase: str | None
    epoch: int | None
    step: int | None
    total_steps: int | None
    loss: float | None
    dev_accuracy: float | None
    message: str | None
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool

    @property
    def duration_s(self) -> float | None:
        """Claim to ending for a finished job; None while it runs or if it never started."""
        if self.finished_at is None or self.started_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return max(0.0, min(1.0, self.step / self.total_steps))

    def as_json(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "id": self.id,
            "lineage": self.lineage,
            "task": self.task,
            "method": self.method,
            "state": self.state,
            "phase": self.phase,
            "epoch": self.epoch,
            "step": self.step,
            "total_steps": self.total_steps,
            "fraction": self.fraction,
            "loss": self.loss,
            "dev_accuracy": self.dev_accuracy,
            "message": self.message,
            "attempts": self.attempts,
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_s": self.duration_s,
        }


def lineage_names(session: Session) -> list[str]:
    """Every lineage that has a version or a job, in name order."""
    names = set(session.scalars(select(ModelVersion.lineage).distinct()))
    names.update(session.scalars(select(Job.lineage).distinct()))
    return sorted(names)


def _number(value: Any) -> float | None:
    # Metrics are JSON written by the worker; anything not a finite number is "not recorded".
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if v == v and abs(v) != float("inf") else None


def _test_accuracy(v: VersionInfo) -> float | None:
    test = v.metrics.get("test")
    return _number(test.get("accuracy")) if isinstance(test, dict) else None


def lineage_view(session: Session, lineage: str) -> LineageView:
    """The lineage's versions (timeline) and its tasks x versions matrix."""
    versions = list_versions(session, lineage)
    task_names = {t.id: t.name for t in list_tasks(session)}
    by_id = {v.id: v for v in versions}

    rows: list[VersionRow] = []
    seen_uris: set[str] = set()
    models = task_states = 0
    for v in versions:  # number order: a state's bytes count where it first appears
        states = list_task_states(session, v.id)
        new = 0 if v.artifact.uri in seen_uris else v.artifact.bytes
        models += new
        seen_uris.add(v.artifact.uri)
        for s in states:  # the ranker's state, and the retriever's where tuned
            for art in (s.artifact, s.tower):
                if art is not None and art.uri not in seen_uris:
                    new += art.bytes
                    task_states += art.bytes
                    seen_uris.add(art.uri)
        parent = by_id.get(v.parent_id) if v.parent_id is not None else None
        error = v.metrics.get("error")
        rows.append(
            VersionRow(
                id=v.id,
                number=v.number,
                state=v.state.value,
                parent_number=parent.number if parent else None,
                task=task_names.get(v.task_id) if v.task_id is not None else None,
                method=v.method,
                lambdas=dict(v.lambdas),
                created_at=v.created_at,
                activated_at=v.activated_at,
                job_id=v.job_id,
                model_bytes=v.artifact.bytes,
                state_bytes=sum(
                    s.artifact.bytes + (s.tower.bytes if s.tower else 0) for s in states
                ),
                new_bytes=new,
                test_accuracy=_test_accuracy(v),
                error=str(error) if error is not None else None,
                carries=tuple(task_names.get(s.task_id, "?") for s in states),
                baselines=_baselines(v),
                ranker=_ranker(v),
                retriever=_retriever(v),
                confidence=_confidence(v),
            )
        )

    # A later version's Ω of a task is measured against the anchor of the version
    # that learned it, so it only means something for that version's descendants
    # (a failed version's siblings never carried its task).
    def descends(j: int, ancestor_id: int) -> bool:
        seen, pid = set(), versions[j].parent_id
        while pid is not None and pid not in seen:
            if pid == ancestor_id:
                return True
            seen.add(pid)
            pid = by_id[pid].parent_id if pid in by_id else None
        return False

    tasks: list[TaskRow] = []
    for i, v in enumerate(versions):
        name = task_names.get(v.task_id) if v.task_id is not None else None
        if name is None:
            continue
        cells: list[Cell | None] = [None] * len(versions)
        acc = _test_accuracy(v)
        cells[i] = Cell("learned", acc) if acc is not None else Cell("none")
        for j in range(i + 1, len(versions)):
            if not descends(j, v.id):
                continue
            forgetting = versions[j].metrics.get("predicted_forgetting")
            value = _number(forgetting.get(name)) if isinstance(forgetting, dict) else None
            cells[j] = Cell("forgetting", value) if value is not None else Cell("none")
        tasks.append(TaskRow(name, v.number, tuple(cells)))

    return LineageView(
        lineage,
        tuple(rows),
        tuple(tasks),
        fingerprint(versions),
        history=_history(session, versions),
        storage=Storage(models, task_states, _ontology_bytes(session, versions)),
    )


def _ranker(v: VersionInfo) -> str | None:
    kind = v.metrics.get("ranker")
    return kind if isinstance(kind, str) else None


def _retriever(v: VersionInfo) -> str | None:
    """One line on the version's retriever: its mode, and whether its query
    tower was tuned here (dev recall before -> after, earlier tasks kept) or
    carried from the parent. None: recorded before the worker said."""
    mode = v.metrics.get("retriever_mode")
    info = v.metrics.get("retriever")
    if not isinstance(mode, str):
        return None
    if not isinstance(info, dict) or not (info.get("tuned") or info.get("carried")):
        return f"{mode}, shipped encoder" if mode == "fused" else mode
    if not info.get("tuned"):
        return f"{mode}, tower carried from the parent"
    try:
        k, before, after = (
            info["dev_recall_at"],
            info["dev_recall_before"],
            info["dev_recall_after"],
        )
        kept = int(info.get("prior_tasks") or 0)
        change = f"dev recall@{k} {float(before):.3f} → {float(after):.3f}"
    except (KeyError, TypeError, ValueError):
        return f"{mode}, tower tuned"
    return f"{mode}, tower tuned: {change}, {kept} earlier task{'' if kept == 1 else 's'} kept"


def _confidence(v: VersionInfo) -> str | None:
    """Per ontology, whether its answers' confidence is calibrated and which
    version fitted that calibration ("icd10cm calibrated by v1, hpo
    calibrated here"). None: recorded before the worker said."""
    by = v.metrics.get("by_ontology")
    if not isinstance(by, dict) or not by:
        return None
    parts = []
    for name in sorted(by):
        rec = by[name]
        if not isinstance(rec, dict):
            continue
        fitted = rec.get("fitted_by_version")
        who = "here" if fitted is None else f"by v{fitted}"
        parts.append(
            f"{name} calibrated {who}" if rec.get("calibration") else f"{name} uncalibrated"
        )
    return ", ".join(parts) or None


def _baselines(v: VersionInfo) -> tuple[Baseline, ...]:
    """``metrics["baselines"]``: name -> the test split's metrics (accuracy is
    top-1; retrievers also give recall@10). Anything malformed is left out."""
    recorded = v.metrics.get("baselines")
    if not isinstance(recorded, dict):
        return ()
    out = []
    for name, m in recorded.items():
        if isinstance(m, dict):
            out.append(Baseline(str(name), _number(m.get("accuracy")), _number(m.get("recall@10"))))
    return tuple(out)


def _history(session: Session, versions: list[VersionInfo]) -> tuple[Activation, ...]:
    numbers = {v.id: v.number for v in versions}
    out = []
    for action in (AuditAction.PROMOTED, AuditAction.ROLLED_BACK):
        for e in list_audit(session, action=action):
            vid = int(e.subject.partition(":")[2] or 0)
            if vid not in numbers:
                continue
            prev = e.details.get("previous_id")
            reason = e.details.get("reason")
            out.append(
                Activation(
                    at=e.at,
                    action=e.action,
                    version=numbers[vid],
                    previous=numbers.get(prev) if isinstance(prev, int) else None,
                    actor=e.actor,
                    reason=str(reason) if reason is not None else None,
                )
            )
    return tuple(sorted(out, key=lambda a: a.at, reverse=True))


def _ontology_bytes(session: Session, versions: list[VersionInfo]) -> int:
    """The stored concepts files of the ontologies this lineage's tasks link into."""
    task_ids = {v.task_id for v in versions if v.task_id is not None}
    onto_ids = {t.ontology_id for t in list_tasks(session) if t.id in task_ids}
    uris = {
        o.artifact.uri: o.artifact.bytes
        for o in list_ontologies(session)
        if o.id in onto_ids and o.artifact is not None
    }
    return sum(uris.values())


def fingerprint(versions: list[VersionInfo]) -> str:
    """Changes when a version is added or changes state: what the page polls for
    (cheap: one query, where the whole view reads every version's task states)."""
    if not versions:
        return ""
    key = repr([(v.id, v.state.value, v.activated_at) for v in versions])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _job_row(job: JobInfo) -> JobRow:
    p = job.progress

    def num(key: str) -> float | None:
        return _number(p.get(key))

    def whole(key: str) -> int | None:
        v = num(key)
        return int(v) if v is not None else None

    task = job.payload.get("task_name")
    method = job.payload.get("method")
    # A finished job's last progress message ("write started") would read as if it still ran.
    message = None if job.finished else p.get("message")
    return JobRow(
        id=job.id,
        lineage=job.lineage,
        task=task if isinstance(task, str) else None,
        method=method if isinstance(method, str) else None,
        state=job.state.value,
        phase=job.phase,
        epoch=whole("epoch"),
        step=whole("step"),
        total_steps=whole("total_steps"),
        loss=num("loss"),
        dev_accuracy=num("dev_accuracy"),
        message=message if isinstance(message, str) else None,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        cancel_requested=job.cancel_requested,
    )


def jobs_view(
    session: Session, lineage: str | None = None, *, recent: int = RECENT_JOBS
) -> list[JobRow]:
    """Running and queued jobs (all of them), then the ``recent`` newest finished ones."""
    live_states = ("running", "queued")
    q = select(Job).order_by(Job.id.desc())
    if lineage is not None:
        q = q.where(Job.lineage == lineage)
    live = session.scalars(q.where(Job.state.in_(live_states))).all()
    done = session.scalars(q.where(Job.state.not_in(live_states)).limit(recent)).all()
    return [_job_row(JobInfo.of(r)) for r in (*live, *done)]
