"""The update job tunes the retriever's query tower when ``retriever_tune`` is
on (issue 12, item 2): the tuned tower is part of the version, each task's
tower state is stored beside its ranker state and carried forward, the next
update is penalised by it, and the service retrieves with the served
version's own tower. Real MiniLM, SQLite registry, tmp artifact folder.

The tasks link made-up lay words (MiniLM cannot know them) to plain names,
so only tuning can make the dense side find them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from worker_factories import ALPHA, BETA, TINY_RANKER, TINY_TRAIN, lay_task, stage

from kronlink.contract import UpdateJobSpec
from kronlink.data.io import ONTOLOGY_FILE, read_ontology
from kronlink.data.schema import Task
from kronlink.registry import (
    active_version,
    create_job,
    get_job,
    get_ontology,
    list_task_states,
    referenced_artifact_uris,
)
from kronlink.retrieval import retriever_for
from kronlink.retrieval.tower import TOWER_DIR, QueryTower
from kronlink.settings import Settings
from service.batching import LinkItem, rank_items
from service.holder import load_version
from service.ontologies import OntologyIndex
from worker.job import JobContext, Outcome, run_job


@pytest.fixture
def tuned(ctx: JobContext, settings: Settings) -> JobContext:
    update = {
        "retriever_mode": "fused",
        "retriever_tune": True,
        "retriever_lr": 3e-4,
        "retriever_epochs": 6,
        "retriever_eval_k": 1,  # 8 concepts: recall@10 would always be 1
        "retriever_curvature_queries": 16,
    }
    return replace(ctx, settings=settings.model_copy(update=update))


def submit(ctx: JobContext, task: Task, **spec) -> int:
    payload = UpdateJobSpec(
        task_name=task.name,
        staged_id=stage(ctx.settings, task),
        train=TINY_TRAIN,
        ranker=TINY_RANKER,
        **spec,
    ).model_dump(mode="json")
    with ctx.factory.begin() as s:
        job, _ = create_job(s, lineage="main", payload=payload, idempotency_key=task.name)
    return job.id


def run_ok(ctx: JobContext, task: Task, **spec):
    job_id = submit(ctx, task, **spec)
    outcome = run_job(ctx, job_id)
    with ctx.factory.begin() as s:
        job, v = get_job(s, job_id), active_version(s, "main")
        states = list_task_states(s, v.id) if v else []
    assert outcome == Outcome.SUCCEEDED, job.error
    return v, states


def served(ctx: JobContext, v, ontology: str) -> tuple[object, OntologyIndex]:
    """What a service replica loads: the version (its tower, if any) and the
    ontology's stored retriever."""
    scratch = Path(ctx.settings.data_path) / f"serve-{v.id}-{ontology}"
    model = load_version(ctx.store, v, "cpu")
    with ctx.factory.begin() as s:
        onto = get_ontology(s, ontology)
    path = ctx.store.get(ctx.store.key_of(onto.artifact.uri), onto.artifact.sha256, scratch)
    concepts = read_ontology(path / ONTOLOGY_FILE)
    retriever = retriever_for(concepts, ctx.settings, folder=path)
    return model, OntologyIndex(onto, retriever, {c.id: c for c in concepts})


def top1_share(index: OntologyIndex, words: dict[str, str], encoder) -> float:
    found = index.retrieve(list(words.values()), 1, encoder=encoder)
    names = [cands[0].name for cands, _ in found]
    return sum(n == want for n, want in zip(names, words, strict=True)) / len(words)


def tower_of(ctx: JobContext, v) -> QueryTower:
    path = ctx.store.get(
        ctx.store.key_of(v.artifact.uri), v.artifact.sha256, Path(ctx.settings.data_path) / "t"
    )
    return QueryTower.load(path / TOWER_DIR)


def test_the_job_tunes_stores_carries_and_serves_the_retriever(tuned: JobContext) -> None:
    alpha, beta = lay_task("alpha", ALPHA, 1), lay_task("beta", BETA, 2)

    # version 1: the tower learns alpha's lay words, no penalty (nothing before)
    v1, states1 = run_ok(tuned, alpha, method="none")
    r1 = v1.metrics["retriever"]
    assert r1["tuned"] and r1["penalty"] == "none" and r1["prior_tasks"] == 0
    assert r1["dev_recall_after"] >= r1["dev_recall_before"] + 0.25, r1
    assert r1["last_penalty"] == 0.0
    assert len(states1) == 1 and states1[0].tower is not None

    # the service retrieves with the version's tower, not the shipped encoder
    model1, index_a = served(tuned, v1, "alpha")
    assert model1.query_encoder is not None
    shipped, learned = (
        top1_share(index_a, ALPHA, None),
        top1_share(index_a, ALPHA, model1.query_encoder),
    )
    assert learned >= shipped + 0.25, (shipped, learned)
    answers = rank_items(model1, [LinkItem("wheezle", index=index_a, k=4)], max_size=8)
    assert "Asthma" in [r["name"] for r in answers[0]], list(answers[0])

    # version 2: beta, under the penalty of alpha's tower state
    v2, states2 = run_ok(tuned, beta, method="kfc-expand", lambdas=1.0)
    r2 = v2.metrics["retriever"]
    assert r2["tuned"] and r2["penalty"] == "kfc-expand" and r2["prior_tasks"] == 1, r2
    assert r2["lambda"] == tuned.settings.retriever_lambda
    assert r2["dev_recall_after"] >= r2["dev_recall_before"] + 0.25, r2
    assert r2["last_penalty"] > 0.0, r2  # alpha's state is in the loss
    # the forecast of alpha's retrieval loss rise: ½ Ω at the kept tower, which moved
    assert list(r2["predicted_forgetting"]) == ["alpha"] and r2["predicted_forgetting"]["alpha"] > 0
    assert r1["predicted_forgetting"] == {}
    by_task = {s.task_id: s for s in states2}
    assert len(by_task) == 2 and all(s.tower is not None for s in states2)
    assert states1[0].tower in [s.tower for s in states2]  # alpha's state carried, not copied
    model2, index_a2 = served(tuned, v2, "alpha")
    # alpha's lay words still retrieved by version 2's tower
    kept = top1_share(index_a2, ALPHA, model2.query_encoder)
    assert kept >= learned - 0.25, (learned, kept)
    print(f"alpha top-1: shipped {shipped}, v1 {learned}, v2 {kept}; v1 {r1}; v2 {r2}")

    # version 3 without tuning: the tower and every tower state carry forward
    plain = replace(tuned, settings=tuned.settings.model_copy(update={"retriever_tune": False}))
    gamma = lay_task("gamma", {"Fever": "hot", "Cough": "bark", "Gout": "toe", "Rash": "red"}, 3)
    v3, states3 = run_ok(plain, gamma, method="kfc-expand", lambdas=1.0)
    assert v3.metrics["retriever"] == {"tuned": False, "carried": True}
    assert [s.tower for s in states3 if s.tower is not None] == [s.tower for s in states2]
    t2, t3 = tower_of(tuned, v2).encoder.state_dict(), tower_of(plain, v3).encoder.state_dict()
    assert all(t2[k].equal(t3[k]) for k in t2)

    # the sweep keeps every tower state: the registry references them
    with tuned.factory.begin() as s:
        refs = referenced_artifact_uris(s)
    assert {s.tower.uri for s in states2} <= refs


def test_tuning_needs_the_fused_retriever(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="retriever_tune needs retriever_mode 'fused'"):
        Settings(data_dir=tmp_path, retriever_tune=True, retriever_mode="bm25")
