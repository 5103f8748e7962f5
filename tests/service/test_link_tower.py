"""/v1/link retrieves with the served version's tuned query tower (issue 12,
item 2), over HTTP from a real uvicorn, after the real job body made the
version with ``retriever_tune`` on. Real MiniLM, SQLite registry.

With one generated candidate a query (``bm25_candidates`` = 1) the answer is
the retriever's first concept, so the HTTP answers show which encoder the
service searched with."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from service_factories import live_server, make_registry, service_settings, wait_until

from kronlink.contract import UpdateJobSpec
from kronlink.data.io import save_task
from kronlink.data.splits import without_query_strings
from kronlink.registry import create_job
from kronlink.retrieval import retriever_for
from service import create_app
from worker.job import JobContext, Outcome, run_job

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "worker") not in sys.path:  # the worker tests' tiny settings
    sys.path.append(str(REPO / "tests" / "worker"))
from worker_factories import ALPHA, TINY_RANKER, TINY_TRAIN, lay_task  # noqa: E402


def test_link_answers_with_the_versions_tuned_retriever(tmp_path: Path) -> None:
    settings = service_settings(
        tmp_path,
        retriever_mode="fused",
        retriever_tune=True,
        retriever_lr=3e-4,
        retriever_epochs=6,
        retriever_eval_k=1,  # 8 concepts: recall@10 would always be 1
        retriever_curvature_queries=16,
        bm25_candidates=1,
    )
    reg = make_registry(settings)
    task = lay_task("alpha", ALPHA, 1)
    staged = uuid.uuid4().hex
    save_task(task, settings.staging_path / staged)
    spec = UpdateJobSpec(
        task_name="alpha", staged_id=staged, method="none", train=TINY_TRAIN, ranker=TINY_RANKER
    )
    with reg.factory.begin() as s:
        job, _ = create_job(s, lineage="main", payload=spec.model_dump(mode="json"))
    ctx = JobContext(settings, reg.factory, reg.store, owner="test")
    assert run_job(ctx, job.id) == Outcome.SUCCEEDED

    # the same ontology searched with the shipped encoder: what a service
    # without the version's tower would answer
    shipped = retriever_for(without_query_strings(task.concepts, task.queries), settings)
    names = {c.id: c.name for c in task.concepts}
    hits = shipped.search(list(ALPHA.values()), 1)
    shipped_right = sum(names[h[0][0]] == n for h, n in zip(hits, ALPHA, strict=True))

    app = create_app(settings)
    with live_server(app) as live, live.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout_s=60)
        answers = {}
        for lay in ALPHA.values():
            r = c.post("/v1/link", json={"mention": lay, "ontology": "alpha"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"]["number"] == 1
            answers[lay] = body["results"][0]["name"] if body["results"] else None
    served_right = sum(answers[lay] == name for name, lay in ALPHA.items())
    print(f"right of {len(ALPHA)}: shipped encoder {shipped_right}, served tower {served_right}")
    assert answers["wheezle"] == "Asthma", answers
    assert served_right >= shipped_right + 2, (shipped_right, served_right, answers)
