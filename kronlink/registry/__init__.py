"""The model registry: ontologies, tasks, model versions, jobs and the audit log.

SQLAlchemy 2 models (``models``), a repository API of plain functions that take
a Session (``versions``, ``jobs``), engine and lock helpers (``db``), the
artifact store (``artifacts``) and migrations (``migrate``). docs/registry.md
describes the schema, the state machines and the lock and lease design.
"""

from kronlink.registry.artifacts import ArtifactStore, task_state_key, version_key
from kronlink.registry.db import (
    create_engine_from_url,
    default_database_url,
    lineage_transaction,
    lock_lineage,
    make_session_factory,
)
from kronlink.registry.errors import (
    ConflictError,
    InvalidTransitionError,
    LeaseLostError,
    NotFoundError,
    RegistryError,
)
from kronlink.registry.jobs import (
    DEFAULT_MAX_ATTEMPTS,
    claim_job,
    claim_next_job,
    create_job,
    finish_job,
    get_job,
    heartbeat,
    list_jobs,
    recover_expired_jobs,
    request_cancel,
    update_progress,
)
from kronlink.registry.migrate import current_revision, head_revision, upgrade
from kronlink.registry.models import AuditAction, JobState, VersionState
from kronlink.registry.records import (
    ArtifactInfo,
    AuditEntry,
    JobInfo,
    OntologyInfo,
    TaskInfo,
    TaskStateInfo,
    VersionInfo,
)
from kronlink.registry.versions import (
    activate_version,
    active_version,
    add_task_state,
    create_ontology,
    create_task,
    create_version,
    get_ontology,
    get_task,
    get_version,
    list_audit,
    list_ontologies,
    list_task_states,
    list_tasks,
    list_versions,
    mark_version_failed,
    record_audit,
    rollback,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "ArtifactInfo",
    "ArtifactStore",
    "AuditAction",
    "AuditEntry",
    "ConflictError",
    "InvalidTransitionError",
    "JobInfo",
    "JobState",
    "LeaseLostError",
    "NotFoundError",
    "OntologyInfo",
    "RegistryError",
    "TaskInfo",
    "TaskStateInfo",
    "VersionInfo",
    "VersionState",
    "activate_version",
    "active_version",
    "add_task_state",
    "claim_job",
    "claim_next_job",
    "create_engine_from_url",
    "create_job",
    "create_ontology",
    "create_task",
    "create_version",
    "current_revision",
    "default_database_url",
    "finish_job",
    "get_job",
    "get_ontology",
    "get_task",
    "get_version",
    "head_revision",
    "heartbeat",
    "lineage_transaction",
    "list_audit",
    "list_jobs",
    "list_ontologies",
    "list_task_states",
    "list_tasks",
    "list_versions",
    "lock_lineage",
    "make_session_factory",
    "mark_version_failed",
    "record_audit",
    "recover_expired_jobs",
    "request_cancel",
    "rollback",
    "task_state_key",
    "update_progress",
    "upgrade",
    "version_key",
]
