"""Repository functions for ontologies, tasks, model versions and the audit log.

Every function takes a :class:`~sqlalchemy.orm.Session`, flushes, and leaves
the commit to the caller, so several calls form one atomic unit::

    with factory.begin() as session:
        v = create_version(session, ...)
        activate_version(session, v.id, actor="worker")
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kronlink.registry.db import lock_lineage, row_by_id
from kronlink.registry.errors import (
    ConflictError,
    InvalidTransitionError,
    NotFoundError,
    RegistryError,
)
from kronlink.registry.models import (
    AuditAction,
    AuditLog,
    ModelVersion,
    Ontology,
    Task,
    TaskState,
    VersionState,
    utcnow,
)
from kronlink.registry.records import (
    ArtifactInfo,
    AuditEntry,
    OntologyInfo,
    TaskInfo,
    TaskStateInfo,
    VersionInfo,
)

__all__ = [
    "activate_version",
    "active_version",
    "add_task_state",
    "create_ontology",
    "create_task",
    "create_version",
    "get_ontology",
    "get_task",
    "get_version",
    "list_audit",
    "list_ontologies",
    "list_task_states",
    "list_tasks",
    "list_versions",
    "mark_version_failed",
    "record_audit",
    "referenced_artifact_uris",
    "rollback",
]

# Keys that would mean training data found its way into the audit log.
_FORBIDDEN_DETAIL_KEYS = frozenset(
    {"mention", "mentions", "left_context", "right_context", "queries", "query", "text"}
)


def record_audit(
    session: Session,
    action: AuditAction | str,
    subject: str,
    *,
    actor: str = "system",
    details: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEntry:
    """Append one audit row. ``details`` holds ids, counts and hashes, never data."""
    details = dict(details or {})
    bad = _FORBIDDEN_DETAIL_KEYS.intersection(details)
    if bad:
        raise RegistryError(
            f"audit details must not carry training data; got key(s) {', '.join(sorted(bad))}"
        )
    row = AuditLog(
        action=AuditAction(action).value,
        subject=subject,
        actor=actor,
        details=details,
        at=at or utcnow(),
    )
    session.add(row)
    session.flush()
    return AuditEntry.of(row)


def list_audit(
    session: Session, *, subject: str | None = None, action: AuditAction | str | None = None
) -> list[AuditEntry]:
    q = select(AuditLog).order_by(AuditLog.id)
    if subject is not None:
        q = q.where(AuditLog.subject == subject)
    if action is not None:
        q = q.where(AuditLog.action == AuditAction(action).value)
    return [AuditEntry.of(r) for r in session.scalars(q)]


def _insert_unique(session: Session, row: Any, what: str) -> None:
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:
        raise ConflictError(f"{what} already exists") from exc


def create_ontology(
    session: Session,
    name: str,
    *,
    source: str | None = None,
    concept_count: int | None = None,
    artifact: ArtifactInfo | None = None,
) -> OntologyInfo:
    row = Ontology(name=name, source=source, concept_count=concept_count)
    if artifact is not None:
        row.artifact_uri, row.artifact_sha256 = artifact.uri, artifact.sha256
        row.artifact_bytes = artifact.bytes
    _insert_unique(session, row, f"ontology {name!r}")
    return OntologyInfo.of(row)


def get_ontology(session: Session, id_or_name: int | str) -> OntologyInfo:
    """An ontology by id or by name; NotFoundError names what exists."""
    if isinstance(id_or_name, int):
        row = session.get(Ontology, id_or_name)
    else:
        row = session.scalars(select(Ontology).where(Ontology.name == id_or_name)).first()
    if row is None:
        names = session.scalars(select(Ontology.name).order_by(Ontology.id)).all()
        raise NotFoundError(
            f"ontology {id_or_name!r} does not exist; registered: {', '.join(names) or 'none'}"
        )
    return OntologyInfo.of(row)


def list_ontologies(session: Session) -> list[OntologyInfo]:
    return [OntologyInfo.of(r) for r in session.scalars(select(Ontology).order_by(Ontology.id))]


def create_task(
    session: Session, name: str, *, ontology_id: int, sizes: Mapping[str, int] | None = None
) -> TaskInfo:
    if session.get(Ontology, ontology_id) is None:
        raise NotFoundError(f"ontology id {ontology_id} does not exist")
    row = Task(name=name, ontology_id=ontology_id, sizes=dict(sizes or {}))
    _insert_unique(session, row, f"task {name!r}")
    return TaskInfo.of(row)


def get_task(session: Session, task_id_or_name: int | str) -> TaskInfo:
    if isinstance(task_id_or_name, int):
        row = session.get(Task, task_id_or_name)
    else:
        row = session.scalar(select(Task).where(Task.name == task_id_or_name))
    if row is None:
        raise NotFoundError(f"task {task_id_or_name!r} does not exist")
    return TaskInfo.of(row)


def list_tasks(session: Session) -> list[TaskInfo]:
    return [TaskInfo.of(r) for r in session.scalars(select(Task).order_by(Task.id))]


def _version_row(session: Session, version_id: int, *, for_update: bool = False) -> ModelVersion:
    return row_by_id(session, ModelVersion, version_id, "model version", for_update=for_update)


def get_version(session: Session, version_id: int) -> VersionInfo:
    return VersionInfo.of(_version_row(session, version_id))


def active_version(session: Session, lineage: str) -> VersionInfo | None:
    """The version that serves ``lineage``, or None before the first activation."""
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.lineage == lineage, ModelVersion.state == VersionState.ACTIVE
        )
    )
    return None if row is None else VersionInfo.of(row)


def list_versions(session: Session, lineage: str | None = None) -> list[VersionInfo]:
    q = select(ModelVersion).order_by(ModelVersion.lineage, ModelVersion.number)
    if lineage is not None:
        q = q.where(ModelVersion.lineage == lineage)
    return [VersionInfo.of(r) for r in session.scalars(q)]


def create_version(
    session: Session,
    *,
    lineage: str,
    method: str,
    artifact: ArtifactInfo,
    parent_id: int | None = None,
    task_id: int | None = None,
    lambdas: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    job_id: int | None = None,
    actor: str = "system",
) -> VersionInfo:
    """A new candidate version numbered after the lineage's last one.

    Takes the lineage lock (:func:`~kronlink.registry.db.lock_lineage`), so two
    concurrent creators get consecutive numbers, and writes an audit row.
    """
    lock_lineage(session, lineage)
    if parent_id is not None and _version_row(session, parent_id).lineage != lineage:
        raise RegistryError(
            f"parent version {parent_id} belongs to another lineage than {lineage!r}"
        )
    last = session.scalar(
        select(func.max(ModelVersion.number)).where(ModelVersion.lineage == lineage)
    )
    row = ModelVersion(
        lineage=lineage,
        number=(last or 0) + 1,
        parent_id=parent_id,
        task_id=task_id,
        state=VersionState.CANDIDATE,
        method=method,
        lambdas=dict(lambdas or {}),
        metrics=dict(metrics or {}),
        artifact_uri=artifact.uri,
        artifact_sha256=artifact.sha256,
        artifact_bytes=artifact.bytes,
        job_id=job_id,
    )
    session.add(row)
    session.flush()
    record_audit(
        session,
        AuditAction.VERSION_CREATED,
        f"version:{row.id}",
        actor=actor,
        details={"lineage": lineage, "number": row.number, "parent_id": parent_id},
    )
    return VersionInfo.of(row)


def add_task_state(
    session: Session,
    version_id: int,
    task_id: int,
    artifact: ArtifactInfo,
    *,
    tower: ArtifactInfo | None = None,
) -> TaskStateInfo:
    """Attach a task's curvature state (factors and anchor) to a version, and
    the retriever's state for that task where the retriever was tuned."""
    _version_row(session, version_id)
    row = TaskState(
        version_id=version_id,
        task_id=task_id,
        artifact_uri=artifact.uri,
        artifact_sha256=artifact.sha256,
        artifact_bytes=artifact.bytes,
        tower_uri=tower.uri if tower else None,
        tower_sha256=tower.sha256 if tower else None,
        tower_bytes=tower.bytes if tower else None,
    )
    _insert_unique(session, row, f"state of task {task_id} in version {version_id}")
    return TaskStateInfo.of(row)


def referenced_artifact_uris(session: Session) -> set[str]:
    """Every artifact URI a registry row points at: versions, task states (and
    their retriever states), ontologies."""
    uris: set[str] = set()
    columns = (
        ModelVersion.artifact_uri,
        TaskState.artifact_uri,
        TaskState.tower_uri,
        Ontology.artifact_uri,
    )
    for column in columns:
        uris.update(u for u in session.scalars(select(column)) if u)
    return uris


def list_task_states(session: Session, version_id: int) -> list[TaskStateInfo]:
    q = select(TaskState).where(TaskState.version_id == version_id).order_by(TaskState.task_id)
    return [TaskStateInfo.of(r) for r in session.scalars(q)]


def activate_version(
    session: Session, version_id: int, *, actor: str = "system", reason: str | None = None
) -> VersionInfo:
    """Make a version the lineage's active one; the previous active one retires.

    A candidate's activation is audited as ``promoted``, a retired version's
    as ``rolled_back``; the retirement gets its own row. Locks the lineage;
    the partial unique index rejects a second active version whatever happens.
    Activating the active version does nothing.
    """
    target = _version_row(session, version_id)
    lock_lineage(session, target.lineage)
    session.refresh(target)
    if target.state == VersionState.ACTIVE:
        return VersionInfo.of(target)
    if target.state == VersionState.FAILED:
        raise InvalidTransitionError(
            f"version {version_id} failed and cannot be activated (expected candidate or retired)"
        )
    now = utcnow()
    previous = session.scalar(
        select(ModelVersion).where(
            ModelVersion.lineage == target.lineage, ModelVersion.state == VersionState.ACTIVE
        )
    )
    details: dict[str, Any] = {
        "lineage": target.lineage,
        "number": target.number,
        "previous_id": previous.id if previous else None,
    }
    if reason:
        details["reason"] = reason
    if previous is not None:
        previous.state = VersionState.RETIRED
        session.flush()  # retire first: the index allows one active row at any moment
        record_audit(
            session,
            AuditAction.RETIRED,
            f"version:{previous.id}",
            actor=actor,
            details={"lineage": target.lineage, "replaced_by": target.id},
            at=now,
        )
    action = (
        AuditAction.ROLLED_BACK if target.state == VersionState.RETIRED else AuditAction.PROMOTED
    )
    target.state = VersionState.ACTIVE
    target.activated_at = now
    session.flush()
    record_audit(session, action, f"version:{target.id}", actor=actor, details=details, at=now)
    return VersionInfo.of(target)


def rollback(
    session: Session,
    lineage: str,
    *,
    to_version_id: int | None = None,
    actor: str = "system",
    reason: str | None = None,
) -> VersionInfo:
    """Activate an older version: ``to_version_id``, or the newest retired one
    older than the active version."""
    if to_version_id is None:
        current = active_version(session, lineage)
        q = select(ModelVersion).where(
            ModelVersion.lineage == lineage, ModelVersion.state == VersionState.RETIRED
        )
        if current is not None:
            q = q.where(ModelVersion.number < current.number)
        row = session.scalar(q.order_by(ModelVersion.number.desc()).limit(1))
        if row is None:
            raise InvalidTransitionError(
                f"lineage {lineage!r} has no older version to roll back to"
            )
        to_version_id = row.id
    elif _version_row(session, to_version_id).lineage != lineage:
        raise RegistryError(f"version {to_version_id} does not belong to lineage {lineage!r}")
    return activate_version(session, to_version_id, actor=actor, reason=reason or "rollback")


def mark_version_failed(
    session: Session, version_id: int, *, error: str, actor: str = "system"
) -> VersionInfo:
    """A candidate that failed its quality gate or its job: never served."""
    row = _version_row(session, version_id)
    if row.state != VersionState.CANDIDATE:
        raise InvalidTransitionError(
            f"version {version_id}: expected state candidate, got {row.state.value}"
        )
    row.state = VersionState.FAILED
    row.metrics = {**row.metrics, "error": error}
    session.flush()
    record_audit(
        session,
        AuditAction.VERSION_FAILED,
        f"version:{row.id}",
        actor=actor,
        details={"error": error},
    )
    return VersionInfo.of(row)
