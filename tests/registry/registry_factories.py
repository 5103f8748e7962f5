"""Plain factory functions for registry test data."""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy.orm import Session

from kronlink.registry import (
    ArtifactInfo,
    TaskInfo,
    VersionInfo,
    create_ontology,
    create_task,
    create_version,
)


def random_name(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fake_artifact(tag: str = "") -> ArtifactInfo:
    tag = tag or uuid.uuid4().hex
    return ArtifactInfo(f"file:///artifacts/{tag}", hashlib.sha256(tag.encode()).hexdigest(), 123)


def make_task(session: Session, name: str | None = None) -> TaskInfo:
    onto = create_ontology(session, random_name("onto"), source="test", concept_count=3)
    return create_task(
        session, name or random_name("task"), ontology_id=onto.id, sizes={"train": 5, "dev": 2}
    )


def make_version(
    session: Session, lineage: str = "main", *, parent_id: int | None = None, **kwargs
) -> VersionInfo:
    task = make_task(session)
    return create_version(
        session,
        lineage=lineage,
        method=kwargs.pop("method", "kfc"),
        artifact=kwargs.pop("artifact", fake_artifact()),
        parent_id=parent_id,
        task_id=task.id,
        **kwargs,
    )
