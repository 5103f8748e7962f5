"""A registry with a history, written through the registry API the way the worker writes it.

Lineage ``clinical``: v1 learns icd10cm (bootstrap), v2 hpo (KFC), v3 a task
whose name is an HTML injection attempt (KFC, fails its quality gate), v4
mednorm (KFC, active). Every version is a real tiny CNN ranker in the artifact
store; task states are small files. One more job of the lineage is running.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import (
    ArtifactInfo,
    ArtifactStore,
    JobState,
    activate_version,
    add_task_state,
    claim_job,
    create_job,
    create_ontology,
    create_task,
    create_version,
    finish_job,
    lineage_transaction,
    mark_version_failed,
    update_progress,
)
from kronlink.registry.models import utcnow

LINEAGE = "clinical"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'
OWNER = "gpu0@test"
TINY_RANKER = {"tokenizer": None, "embedding_dim": 8, "channels": 8, "hidden_size": 8}


@dataclass(frozen=True)
class Seeded:
    version_ids: dict[int, int]  # number -> id
    running_job_id: int


def _model(store: ArtifactStore, key: str, seed: int, scratch: Path) -> ArtifactInfo:
    import torch

    from kronlink.models import build_ranker

    torch.manual_seed(seed)
    out = scratch / f"model-{seed}"
    build_ranker("cnn", **TINY_RANKER).save(out)
    return store.put_dir(key, out)


def _state(store: ArtifactStore, key: str, size: int, scratch: Path) -> ArtifactInfo:
    path = scratch / key.replace("/", "_")
    path.write_bytes(random.Random(size).randbytes(size))
    return store.put_file(key, path)


def _metrics(
    acc: float, forgetting: dict[str, float], gate: float | None = None, baselines=None
) -> dict:
    # The shape worker/job.py records; "baselines" as the retrieval branch adds them
    # (the test split's BM25 and retriever figures), on some versions only.
    extra = {"baselines": baselines} if baselines else {}
    return {
        **extra,
        "test": {"accuracy": acc, "mrr": acc + 0.1, "recall": {"1": acc}, "n": 100},
        "dev": {"accuracy": acc, "mrr": acc + 0.1, "recall": {"1": acc}, "n": 50},
        "gate_passed": gate is None or acc >= gate,
        "quality_gate": gate,
        "ranker": "transformer",
        "predicted_forgetting": forgetting,
        "selection": [],
        "timings": {},
    }


BASELINES = {
    2: {"bm25": {"accuracy": 0.412, "n": 100}, "retriever": {"accuracy": 0.503, "recall@10": 0.81}},
    4: {"bm25": {"accuracy": 0.298}, "retriever": {"accuracy": 0.377, "recall@10": 0.74}},
}
JOB_SECONDS = 95  # each seeded job ran this long (claim to finish), plus its number

PLAN = [
    # task, method, λ per prior, test accuracy, predicted forgetting per prior, gate
    ("icd10cm", "none", {}, 0.62, {}, None),
    ("hpo", "kfc", {"icd10cm": 1000.0}, 0.71, {"icd10cm": 0.031}, None),
    (EVIL, "kfc", {"icd10cm": 1000.0, "hpo": 300.0}, 0.12, {"icd10cm": 0.09, "hpo": 0.04}, 0.5),
    (
        "mednorm",
        "kfc",
        {"icd10cm": 1000.0, "hpo": 300.0},
        0.55,
        {"icd10cm": 0.052, "hpo": 0.018},
        None,
    ),
]


def seed_history(factory: sessionmaker[Session], store: ArtifactStore, scratch: Path) -> Seeded:
    """Submit, claim, commit and finish one job per version, as worker/job.py does."""
    scratch.mkdir(parents=True, exist_ok=True)
    ids: dict[int, int] = {}
    active_id: int | None = None
    states: list[tuple[int, ArtifactInfo]] = []  # what the active version carries
    started = utcnow() - timedelta(seconds=300)
    for n, (task, method, lambdas, acc, forgetting, gate) in enumerate(PLAN, start=1):
        with factory.begin() as s:
            job, _ = create_job(
                s, lineage=LINEAGE, payload={"task_name": task, "method": method}, actor="test"
            )
        with lineage_transaction(factory, LINEAGE) as s:
            claim_job(s, job.id, owner=OWNER, lease_s=600, now=started)
        ended = started + timedelta(seconds=JOB_SECONDS + n)
        with factory.begin() as s:
            update_progress(
                s, job.id, owner=OWNER, phase="train", progress={"step": 40, "total_steps": 40}
            )
        model = _model(store, f"versions/{LINEAGE}/j{job.id}-a1", n, scratch)
        state = _state(store, f"states/{LINEAGE}/j{job.id}-a1/t{n}", 1000 * n, scratch)
        onto_art = _state(store, f"ontologies/onto-{n}/j{job.id}-a1", 500 * n, scratch)
        with lineage_transaction(factory, LINEAGE) as s:
            onto = create_ontology(
                s, f"onto-{n}", source="upload", concept_count=10 * n, artifact=onto_art
            )
            t = create_task(
                s, task, ontology_id=onto.id, sizes={"train": 40, "dev": 10, "test": 10}
            )
            v = create_version(
                s,
                lineage=LINEAGE,
                method=method,
                artifact=model,
                parent_id=active_id,
                task_id=t.id,
                lambdas=lambdas,
                metrics=_metrics(acc, forgetting, gate, BASELINES.get(n)),
                job_id=job.id,
                actor=OWNER,
            )
            for task_id, art in states:
                add_task_state(s, v.id, task_id, art)
            add_task_state(s, v.id, t.id, state)
            if gate is None or acc >= gate:
                activate_version(s, v.id, actor=OWNER, reason=f"job {job.id}")
                active_id = v.id
                states = [*states, (t.id, state)]
                finish_job(s, job.id, JobState.SUCCEEDED, owner=OWNER, now=ended)
            else:
                mark_version_failed(
                    s, v.id, error=f"quality gate failed: {acc} < {gate}", actor=OWNER
                )
                finish_job(
                    s, job.id, JobState.FAILED, owner=OWNER, error="quality gate failed", now=ended
                )
        ids[n] = v.id

    with factory.begin() as s:
        job, _ = create_job(
            s, lineage=LINEAGE, payload={"task_name": "medmentions", "method": "kfc"}, actor="test"
        )
    with lineage_transaction(factory, LINEAGE) as s:
        claim_job(s, job.id, owner=OWNER, lease_s=600)
    set_progress(factory, job.id, step=10)
    return Seeded(ids, job.id)


def set_progress(
    factory: sessionmaker[Session], job_id: int, *, step: int, total: int = 200
) -> None:
    """What the worker's throttled ``on_progress`` writes."""
    with factory.begin() as s:
        update_progress(
            s,
            job_id,
            owner=OWNER,
            phase="train",
            progress={
                "epoch": 1 + step // 100,
                "step": step,
                "total_steps": total,
                "loss": 1.5 - step / 400,
                "penalty": 0.01,
                "dev_accuracy": None,
                "message": f"λ=1000 (run 1/1), step {step}",
            },
        )
