"""Versions: one active per lineage, activation and rollback with audit rows."""

from __future__ import annotations

import pytest
from registry_factories import fake_artifact, make_task, make_version
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import (
    AuditAction,
    ConflictError,
    InvalidTransitionError,
    RegistryError,
    VersionState,
    activate_version,
    active_version,
    add_task_state,
    create_ontology,
    list_audit,
    list_task_states,
    list_tasks,
    list_versions,
    mark_version_failed,
    record_audit,
    referenced_artifact_uris,
    rollback,
)
from kronlink.registry.models import ModelVersion


def test_tasks_and_ontologies(session: Session) -> None:
    task = make_task(session, "icd10cm")
    session.commit()
    assert [t.name for t in list_tasks(session)] == ["icd10cm"]
    assert task.sizes == {"train": 5, "dev": 2}
    with pytest.raises(ConflictError, match="task 'icd10cm' already exists"):
        make_task(session, "icd10cm")
    create_ontology(session, "hpo")  # the session still works after the conflict
    session.commit()


def test_versions_number_and_chain(session: Session) -> None:
    v1 = make_version(session)
    v2 = make_version(session, parent_id=v1.id)
    other = make_version(session, lineage="other")
    session.commit()
    assert (v1.number, v2.number, other.number) == (1, 2, 1)
    assert v2.parent_id == v1.id and v2.state == VersionState.CANDIDATE
    assert [v.id for v in list_versions(session, "main")] == [v1.id, v2.id]
    with pytest.raises(RegistryError, match="another lineage"):
        make_version(session, lineage="other", parent_id=v1.id)


def test_activation_retires_previous_and_audits(factory: sessionmaker[Session]) -> None:
    with factory.begin() as s:
        v1 = make_version(s)
        v2 = make_version(s, parent_id=v1.id)
    with factory.begin() as s:
        activate_version(s, v1.id, actor="admin")
    with factory.begin() as s:
        activate_version(s, v2.id, actor="worker")
    with factory() as s:
        assert active_version(s, "main").id == v2.id
        states = {v.id: v.state for v in list_versions(s, "main")}
        assert states == {v1.id: VersionState.RETIRED, v2.id: VersionState.ACTIVE}
        promoted = list_audit(s, action=AuditAction.PROMOTED)
        assert [(a.subject, a.actor) for a in promoted] == [
            (f"version:{v1.id}", "admin"),
            (f"version:{v2.id}", "worker"),
        ]
        assert promoted[1].details["previous_id"] == v1.id
        assert [a.subject for a in list_audit(s, action=AuditAction.RETIRED)] == [
            f"version:{v1.id}"
        ]

    with factory.begin() as s:
        back = rollback(s, "main", actor="admin")
    assert back.id == v1.id
    with factory() as s:
        assert active_version(s, "main").id == v1.id
        rolled = list_audit(s, action=AuditAction.ROLLED_BACK)
        assert [a.subject for a in rolled] == [f"version:{v1.id}"]
        assert rolled[0].details["previous_id"] == v2.id


def test_one_active_per_lineage_is_enforced_by_the_database(session: Session) -> None:
    v1 = make_version(session)
    v2 = make_version(session)
    make_version(session, lineage="other")
    session.commit()
    session.execute(update(ModelVersion).where(ModelVersion.id == v1.id).values(state="active"))
    with pytest.raises(IntegrityError):
        session.execute(update(ModelVersion).where(ModelVersion.id == v2.id).values(state="active"))
        session.flush()
    session.rollback()
    # Other lineages are independent: one active each is fine.
    session.execute(
        update(ModelVersion).values(state="active").where(ModelVersion.lineage == "other")
    )
    session.execute(update(ModelVersion).where(ModelVersion.id == v1.id).values(state="active"))
    session.commit()


def test_failed_versions_cannot_be_activated(session: Session) -> None:
    v1 = make_version(session)
    failed = mark_version_failed(session, v1.id, error="quality gate: dev accuracy 0.1 < 0.5")
    assert failed.state == VersionState.FAILED
    with pytest.raises(InvalidTransitionError, match="cannot be activated"):
        activate_version(session, v1.id)
    with pytest.raises(InvalidTransitionError, match="no older version"):
        rollback(session, "main")


def test_task_states_attach_to_versions(session: Session) -> None:
    task = make_task(session)
    v1 = make_version(session)
    add_task_state(session, v1.id, task.id, fake_artifact("state"))
    session.commit()
    [state] = list_task_states(session, v1.id)
    assert state.task_id == task.id and state.artifact.uri.endswith("/state")
    assert state.tower is None  # learned without tuning the retriever
    with pytest.raises(ConflictError):
        add_task_state(session, v1.id, task.id, fake_artifact("again"))
    # the retriever's state of the same task rides on the same row, and the
    # sweep must keep it (referenced_artifact_uris)
    v2 = make_version(session)
    add_task_state(session, v2.id, task.id, state.artifact, tower=fake_artifact("tower"))
    session.commit()
    [carried] = list_task_states(session, v2.id)
    assert carried.artifact == state.artifact and carried.tower == fake_artifact("tower")
    assert carried.tower.uri in referenced_artifact_uris(session)


def test_audit_refuses_training_data(session: Session) -> None:
    with pytest.raises(RegistryError, match="mentions"):
        record_audit(session, AuditAction.DATA_RECEIVED, "job:1", details={"mentions": ["x"]})
    entry = record_audit(session, AuditAction.DATA_DELETED, "job:1", details={"bytes": 10})
    assert entry.action == "data_deleted"
