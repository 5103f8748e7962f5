"""Frozen results of the repository API: plain values, detached from any session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kronlink.registry.models import (
    AuditLog,
    Job,
    JobState,
    ModelVersion,
    Ontology,
    Task,
    TaskState,
    VersionState,
)

__all__ = [
    "ArtifactInfo",
    "AuditEntry",
    "JobInfo",
    "OntologyInfo",
    "TaskInfo",
    "TaskStateInfo",
    "VersionInfo",
]


@dataclass(frozen=True)
class ArtifactInfo:
    """Where an artifact lives and what it must hash to."""

    uri: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class OntologyInfo:
    id: int
    name: str
    source: str | None
    concept_count: int | None
    created_at: datetime
    artifact: ArtifactInfo | None = None  # the concepts file; None: not stored

    @classmethod
    def of(cls, row: Ontology) -> OntologyInfo:
        art = (
            ArtifactInfo(row.artifact_uri, row.artifact_sha256, row.artifact_bytes or 0)
            if row.artifact_uri and row.artifact_sha256
            else None
        )
        return cls(row.id, row.name, row.source, row.concept_count, row.created_at, art)


@dataclass(frozen=True)
class TaskInfo:
    id: int
    name: str
    ontology_id: int
    sizes: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: Task) -> TaskInfo:
        return cls(row.id, row.name, row.ontology_id, dict(row.sizes), row.created_at)


@dataclass(frozen=True)
class TaskStateInfo:
    version_id: int
    task_id: int
    artifact: ArtifactInfo
    # the retriever's state for the task (kronlink.retrieval.learn), if tuned
    tower: ArtifactInfo | None = None

    @classmethod
    def of(cls, row: TaskState) -> TaskStateInfo:
        art = ArtifactInfo(row.artifact_uri, row.artifact_sha256, row.artifact_bytes)
        tower = (
            ArtifactInfo(row.tower_uri, row.tower_sha256, row.tower_bytes or 0)
            if row.tower_uri and row.tower_sha256
            else None
        )
        return cls(row.version_id, row.task_id, art, tower)


@dataclass(frozen=True)
class VersionInfo:
    id: int
    lineage: str
    number: int
    parent_id: int | None
    task_id: int | None
    state: VersionState
    method: str
    lambdas: dict[str, Any]
    metrics: dict[str, Any]
    artifact: ArtifactInfo
    job_id: int | None
    created_at: datetime
    activated_at: datetime | None

    @classmethod
    def of(cls, row: ModelVersion) -> VersionInfo:
        return cls(
            id=row.id,
            lineage=row.lineage,
            number=row.number,
            parent_id=row.parent_id,
            task_id=row.task_id,
            state=VersionState(row.state),
            method=row.method,
            lambdas=dict(row.lambdas),
            metrics=dict(row.metrics),
            artifact=ArtifactInfo(row.artifact_uri, row.artifact_sha256, row.artifact_bytes),
            job_id=row.job_id,
            created_at=row.created_at,
            activated_at=row.activated_at,
        )


@dataclass(frozen=True)
class JobInfo:
    id: int
    lineage: str
    kind: str
    state: JobState
    phase: str | None
    progress: dict[str, Any]
    payload: dict[str, Any]
    error: str | None
    idempotency_key: str | None
    attempts: int
    owner: str | None
    lease_until: datetime | None
    heartbeat_at: datetime | None
    cancel_requested: bool
    timings: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def of(cls, row: Job) -> JobInfo:
        return cls(
            id=row.id,
            lineage=row.lineage,
            kind=row.kind,
            state=JobState(row.state),
            phase=row.phase,
            progress=dict(row.progress),
            payload=dict(row.payload),
            error=row.error,
            idempotency_key=row.idempotency_key,
            attempts=row.attempts,
            owner=row.owner,
            lease_until=row.lease_until,
            heartbeat_at=row.heartbeat_at,
            cancel_requested=row.cancel_requested,
            timings=dict(row.timings),
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]

    @classmethod
    def of(cls, row: AuditLog) -> AuditEntry:
        return cls(row.id, row.at, row.actor, row.action, row.subject, dict(row.details))
