"""SQLAlchemy 2 models of the registry: the schema of docs/registry.md.

Timestamps are timezone-aware UTC on both databases (:class:`UTCDateTime`);
states are string enums stored as short strings with a CHECK constraint, so
PostgreSQL needs no native enum types and migrations stay plain.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AuditAction",
    "AuditLog",
    "Base",
    "Job",
    "JobState",
    "Lineage",
    "ModelVersion",
    "Ontology",
    "Replica",
    "Task",
    "TaskState",
    "VersionState",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class VersionState(enum.StrEnum):
    CANDIDATE = "candidate"  # written, not serving
    ACTIVE = "active"  # serving; exactly one per lineage
    RETIRED = "retired"  # served before; a rollback target
    FAILED = "failed"  # failed its quality gate or its job; never served


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AuditAction(enum.StrEnum):
    DATA_RECEIVED = "data_received"
    DATA_DELETED = "data_deleted"
    VERSION_CREATED = "version_created"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"
    VERSION_FAILED = "version_failed"
    JOB_SUBMITTED = "job_submitted"
    JOB_CANCEL_REQUESTED = "job_cancel_requested"
    JOB_FINISHED = "job_finished"
    JOB_REQUEUED = "job_requeued"


FINISHED_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that refuses naive datetimes and returns aware UTC.

    SQLite stores no offset, so values are converted to UTC on the way in and
    labelled UTC on the way out; string comparison of the stored values then
    orders them in time (the lease queries rely on it).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got naive {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StrEnumType(TypeDecorator[str]):
    """A :class:`enum.StrEnum` stored as ``VARCHAR(16)``; the CHECK lives in the table."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum_cls: type[enum.StrEnum]) -> None:
        super().__init__()
        self.enum_cls = enum_cls

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_cls(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.enum_cls(value)


def _check_in(column: str, enum_cls: type[enum.StrEnum], name: str) -> CheckConstraint:
    values = ", ".join(f"'{m.value}'" for m in enum_cls)
    return CheckConstraint(f"{column} IN ({values})", name=name)


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads a class-level dict)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        str: String(200),
    }


class Lineage(Base):
    """A chain of model versions that learn one task after another.

    Its row is the lock of the lineage: a job locks it before choosing its
    anchor version (``SELECT ... FOR UPDATE`` on PostgreSQL, a write
    transaction on SQLite; :func:`kronlink.registry.db.lineage_transaction`).
    """

    __tablename__ = "lineages"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    locked_at: Mapped[datetime | None]  # last time a transaction took the lock


class Ontology(Base):
    __tablename__ = "ontologies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    source: Mapped[str | None]  # where it came from (package, URL); public knowledge base
    concept_count: Mapped[int | None]
    # The concepts file, kept for candidate generation (DESIGN.md section 1):
    # an ontology is a public knowledge base, not training data.
    artifact_uri: Mapped[str | None] = mapped_column(String(1000))
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """A learned task. Only its name, ontology and split sizes stay: never its queries."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    ontology_id: Mapped[int] = mapped_column(ForeignKey("ontologies.id"))
    sizes: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"train": n, "dev": n, "test": n}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """An update job. Ids grow with submission, so ``ORDER BY id`` is submission order."""

    __tablename__ = "jobs"
    __table_args__ = (
        _check_in("state", JobState, "state"),
        Index(None, "lineage", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage: Mapped[str] = mapped_column(ForeignKey("lineages.name"))
    kind: Mapped[str] = mapped_column(String(32), default="update")
    state: Mapped[JobState] = mapped_column(StrEnumType(JobState), default=JobState.QUEUED)
    phase: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)  # ids and settings, no data
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(unique=True)
    attempts: Mapped[int] = mapped_column(default=0)  # times claimed (deliveries)
    owner: Mapped[str | None]  # the worker holding the lease
    lease_until: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # phase -> seconds
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        _check_in("state", VersionState, "state"),
        UniqueConstraint("lineage", "number"),
        # Exactly one active version per lineage, enforced by the database.
        Index(
            "uq_model_versions_one_active",
            "lineage",
            unique=True,
            postgresql_where=text("state = 'active'"),
            sqlite_where=text("state = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage: Mapped[str] = mapped_column(ForeignKey("lineages.name"))
    number: Mapped[int]  # 1, 2, ... within the lineage
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))  # the task it learned
    state: Mapped[VersionState] = mapped_column(
        StrEnumType(VersionState), default=VersionState.CANDIDATE
    )
    method: Mapped[str] = mapped_column(String(32))
    lambdas: Mapped[dict[str, Any]] = mapped_column(default=dict)  # prior task -> λ
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # incl. predicted forgetting
    artifact_uri: Mapped[str] = mapped_column(String(1000))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_bytes: Mapped[int] = mapped_column(BigInteger)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None]


class TaskState(Base):
    """A task's curvature state (factors and anchor) carried by a version."""

    __tablename__ = "task_states"
    __table_args__ = (UniqueConstraint("version_id", "task_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    artifact_uri: Mapped[str] = mapped_column(String(1000))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_bytes: Mapped[int] = mapped_column(BigInteger)
    # The retriever's query-tower state for the same task (anchor and factors),
    # where the job tuned the retriever (settings.retriever_tune); else null.
    tower_uri: Mapped[str | None] = mapped_column(String(1000))
    tower_sha256: Mapped[str | None] = mapped_column(String(64))
    tower_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    """Who did what to which subject. ``details`` never holds training data."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str]  # "version:3", "job:7", "task:hpo"
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Replica(Base):
    """One API replica's last report: what it serves and how it went over its
    last interval (service/replicas.py writes it; the dashboard reads it)."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:random
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime] = mapped_column(index=True)
    status: Mapped[dict[str, Any]] = mapped_column(default=dict)
