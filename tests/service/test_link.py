"""/v1/link and /v1/link/batch over real HTTP: answers, every validation error, auth, limits."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_factories import (
    ADMIN,
    READ,
    live_server,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

from kronlink.registry import create_ontology, lineage_transaction
from service import create_app

CANDS = [
    {"id": "D001", "name": "type 2 diabetes mellitus"},
    {"id": "F001", "name": "fever"},
    {"id": "A001", "name": "asthma"},
]


@pytest.fixture
def ready(registry, server):
    """A served version 1 and a client of the live server."""
    v = register_version(registry.factory, registry.store, seed=1)
    with server.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        yield c, v


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the read-only cases of this module (a server per case costs 0.3 s)."""
    reg = make_registry(service_settings(tmp_path_factory.mktemp("link")))
    v = register_version(reg.factory, reg.store, seed=1)
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live, live.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        yield c, v
    reg.factory.kw["bind"].dispose()


def _problem(r, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == f"urn:kronlink:problem:{kind}" and body["status"] == status
    assert body["detail"] and body["request_id"] == r.headers["x-request-id"]
    return body


def test_link_ranks_given_candidates_and_names_the_version(ready) -> None:
    c, v = ready
    r = c.post("/v1/link", json={"mention": "t2dm", "left_context": "hx of", "candidates": CANDS})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model_version"] == {"id": v.id, "lineage": "main", "number": 1}
    res = body["results"]
    assert sorted(x["id"] for x in res) == sorted(x["id"] for x in CANDS)
    assert [x["rank"] for x in res] == [1, 2, 3]
    assert [x["score"] for x in res] == sorted((x["score"] for x in res), reverse=True)
    assert abs(sum(x["probability"] for x in res) - 1) < 1e-5
    assert {x["id"]: x["name"] for x in res} == {x["id"]: x["name"] for x in CANDS}
    top = c.post("/v1/link", json={"mention": "t2dm", "candidates": CANDS, "top_k": 1}).json()
    assert [(x["id"], x["rank"]) for x in top["results"]] == [(res[0]["id"], 1)]


def test_link_generates_candidates_from_a_registered_ontology(shared) -> None:
    c, _ = shared
    r = c.post("/v1/link", json={"mention": "juvenile diabetes", "ontology": "toy"})
    assert r.status_code == 200, r.text
    ids = [x["id"] for x in r.json()["results"]]
    # only concepts sharing a word with the mention: the exact synonym's and the other diabetes
    assert sorted(ids) == ["D001", "D002"]
    r = c.post("/v1/link", json={"mention": "high blood pressure", "ontology": "toy", "top_k": 2})
    assert [x["id"] for x in r.json()["results"]] == ["H001"]


def test_a_mention_the_retriever_finds_nothing_for_is_no_match_with_no_results(shared) -> None:
    """BM25 used to fill the candidates with the ontology's first concepts and
    the ranker picked one of them ("flu" -> "A00 Cholera" on ICD-10-CM)."""
    c, _ = shared
    body = c.post("/v1/link", json={"mention": "flu", "ontology": "toy"}).json()
    assert body["results"] == [] and body["no_match"] is True
    assert body["confidence"] is None  # this version has no calibration
    items = [{"mention": "flu", "ontology": "toy"}, {"mention": "fever", "ontology": "toy"}]
    batch = c.post("/v1/link/batch", json={"items": items}).json()["items"]
    assert batch[0] == {"results": [], "confidence": None, "no_match": True}
    assert batch[1]["results"][0]["id"] == "F001" and batch[1]["no_match"] is False


def test_batch_answers_every_item_with_one_version(shared) -> None:
    c, v = shared
    items = [
        {"mention": "fever", "candidates": CANDS[:2]},
        {"mention": "pyrexia", "ontology": "toy", "top_k": 3},
        {"mention": "asthma", "candidates": CANDS},
    ]
    r = c.post("/v1/link/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"]["id"] == v.id
    assert [len(i["results"]) for i in body["items"]] == [2, 1, 3]  # only F001 has "pyrexia"
    single = c.post("/v1/link", json=items[2]).json()["results"]
    assert [x["id"] for x in body["items"][2]["results"]] == [x["id"] for x in single]


def test_concurrent_requests_share_model_calls(ready, server) -> None:
    c, _ = ready
    body = {"mention": "fever", "candidates": CANDS}
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: c.post("/v1/link", json=body).status_code, range(64)))
    assert codes == [200] * 64
    metrics = c.get("/metrics").text
    count = _metric(metrics, 'kronlink_link_batch_size_count{lineage="main"}')
    total = _metric(metrics, 'kronlink_link_batch_size_sum{lineage="main"}')
    assert total >= 64 and count < total  # some model calls held several queries


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


LONG = "x" * 501
# (case, body, status, problem kind, loc of the first field error or None)
INVALID = [
    ("no mention", {"candidates": CANDS}, 422, "validation-error", "body.mention"),
    (
        "empty mention",
        {"mention": "", "candidates": CANDS},
        422,
        "validation-error",
        "body.mention",
    ),
    (
        "blank mention",
        {"mention": "   ", "candidates": CANDS},
        422,
        "validation-error",
        "body.mention",
    ),
    (
        "mention too long",
        {"mention": LONG, "candidates": CANDS},
        422,
        "validation-error",
        "body.mention",
    ),
    (
        "mention not a string",
        {"mention": 3, "candidates": CANDS},
        422,
        "validation-error",
        "body.mention",
    ),
    (
        "context too long",
        {"mention": "a", "left_context": "y" * 2001, "candidates": CANDS},
        422,
        "validation-error",
        "body.left_context",
    ),
    (
        "lone surrogate",
        {"mention": "a\ud800b", "candidates": CANDS},
        422,
        "validation-error",
        "body.mention",
    ),
    ("no candidates nor ontology", {"mention": "a"}, 422, "validation-error", "body"),
    (
        "both sources",
        {"mention": "a", "candidates": CANDS, "ontology": "toy"},
        422,
        "validation-error",
        "body",
    ),
    (
        "empty candidates",
        {"mention": "a", "candidates": []},
        422,
        "validation-error",
        "body.candidates",
    ),
    (
        "too many candidates",
        {"mention": "a", "candidates": [{"id": str(i), "name": "n"} for i in range(201)]},
        422,
        "validation-error",
        "body.candidates",
    ),
    (
        "duplicate candidate",
        {"mention": "a", "candidates": [CANDS[0], CANDS[0]]},
        422,
        "validation-error",
        "body",
    ),
    (
        "candidate without id",
        {"mention": "a", "candidates": [{"name": "n"}]},
        422,
        "validation-error",
        "body.candidates[0].id",
    ),
    (
        "candidate empty id",
        {"mention": "a", "candidates": [{"id": "", "name": "n"}]},
        422,
        "validation-error",
        "body.candidates[0].id",
    ),
    (
        "candidate extra field",
        {"mention": "a", "candidates": [{"id": "a", "name": "n", "x": 1}]},
        422,
        "validation-error",
        "body.candidates[0].x",
    ),
    (
        "unknown field",
        {"mention": "a", "candidates": CANDS, "k": 3},
        422,
        "validation-error",
        "body.k",
    ),
    (
        "top_k zero",
        {"mention": "a", "candidates": CANDS, "top_k": 0},
        422,
        "validation-error",
        "body.top_k",
    ),
    (
        "unknown ontology",
        {"mention": "a", "ontology": "nope"},
        422,
        "validation-error",
        "body.ontology",
    ),
    (
        "lineage not served",
        {"mention": "a", "candidates": CANDS, "lineage": "other"},
        422,
        "validation-error",
        "body.lineage",
    ),
    ("not an object", [1, 2], 422, "validation-error", "body"),
]


@pytest.mark.parametrize(
    ("body", "status", "kind", "loc"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_link_refuses_bad_input_with_a_problem(shared, body, status, kind, loc) -> None:
    c, _ = shared
    # json.dumps escapes non-ASCII, so a lone surrogate travels as \ud800
    sent = c.post(
        "/v1/link", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    p = _problem(sent, status, kind)
    assert p["errors"][0]["loc"] == loc, p
    assert p["instance"] == "/v1/link"


def test_batch_limits_and_item_locations(shared) -> None:
    c, _ = shared
    p = _problem(c.post("/v1/link/batch", json={"items": []}), 422, "validation-error")
    assert p["errors"][0]["loc"] == "body.items"
    many = {"items": [{"mention": "a", "candidates": CANDS}] * 257}
    _problem(c.post("/v1/link/batch", json=many), 422, "validation-error")
    bad = {"items": [{"mention": "a", "candidates": CANDS}, {"mention": "a", "ontology": "nope"}]}
    p = _problem(c.post("/v1/link/batch", json=bad), 422, "validation-error")
    assert p["errors"][0]["loc"] == "body.items[1].ontology"
    p = _problem(
        c.post("/v1/link/batch", json={"items": [{"mention": ""}]}), 422, "validation-error"
    )
    assert p["errors"][0]["loc"].startswith("body.items[0]")


def test_malformed_json_wrong_type_and_oversized_bodies(shared) -> None:
    c, _ = shared
    headers = {"content-type": "application/json"}
    _problem(c.post("/v1/link", content=b'{"mention": ', headers=headers), 400, "malformed-json")
    p = _problem(c.post("/v1/link", content=b"mention=a"), 422, "validation-error")
    assert "Content-Type: application/json" in p["detail"]
    big = json.dumps({"mention": "a", "left_context": "z" * (1024 * 1024), "candidates": CANDS})
    p = _problem(c.post("/v1/link", content=big, headers=headers), 413, "payload-too-large")
    assert "KRONLINK_MAX_REQUEST_BYTES" in p["detail"]

    def chunks():  # no Content-Length: the limit holds all the same
        yield b'{"mention": "a", "left_context": "'
        for _ in range(20):
            yield b"z" * 65536
        yield b'"}'

    _problem(c.post("/v1/link", content=chunks(), headers=headers), 413, "payload-too-large")
    ok = c.post(
        "/v1/link",
        content=iter([json.dumps({"mention": "a", "candidates": CANDS}).encode()]),
        headers=headers,
    )
    assert ok.status_code == 200, ok.text
    _problem(c.get("/v1/link"), 405, "method-not-allowed")
    _problem(c.get("/v2/nothing"), 404, "not-found")


def test_request_id_is_echoed_or_made(shared) -> None:
    c, _ = shared
    body = {"mention": "a", "candidates": CANDS}
    r = c.post("/v1/link", json=body, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = c.post("/v1/link", json=body, headers={"X-Request-ID": "bad id\twith spaces"})
    assert (
        r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32
    )


def test_no_active_version_is_503_not_500(registry, server) -> None:
    with server.client() as c:
        p = _problem(
            c.post("/v1/link", json={"mention": "a", "candidates": CANDS}), 503, "no-model"
        )
        assert "POST /v1/jobs" in p["detail"] and c.get("/readyz").status_code == 503


def test_ontology_without_stored_concepts(ready, registry) -> None:
    c, _ = ready
    with lineage_transaction(registry.factory, "main") as s:
        create_ontology(s, "old", concept_count=3)
    p = _problem(
        c.post("/v1/link", json={"mention": "a", "ontology": "old"}), 422, "validation-error"
    )
    assert "send candidates" in p["detail"]


def test_read_token(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, read_token=READ))
    register_version(reg.factory, reg.store, seed=1)
    body = {"mention": "a", "candidates": CANDS}
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live, live.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        _problem(c.post("/v1/link", json=body), 401, "unauthorized")
        bad = c.post("/v1/link", json=body, headers={"Authorization": "Bearer wrong"})
        assert _problem(bad, 401, "unauthorized") and bad.headers["www-authenticate"].startswith(
            "Bearer"
        )
        basic = c.post("/v1/link", json=body, headers={"Authorization": "Basic YTpi"})
        _problem(basic, 401, "unauthorized")
        for token in (READ, ADMIN):
            ok = c.post("/v1/link", json=body, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        _problem(c.get("/v1/versions"), 401, "unauthorized")
        assert c.get("/v1/versions", headers={"Authorization": f"Bearer {READ}"}).status_code == 200
        # the read token opens no admin route
        _problem(
            c.get("/v1/jobs", headers={"Authorization": f"Bearer {READ}"}), 401, "unauthorized"
        )
    reg.factory.kw["bind"].dispose()


def test_a_full_queue_answers_429_and_the_queued_requests_complete(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, batch_queue_max=4, max_batch_items=4))
    register_version(reg.factory, reg.store, seed=1)
    app = create_app(reg.settings, enqueue=reg.sent.append)
    body = {"mention": "a", "candidates": CANDS}
    gate = threading.Event()
    with live_server(app) as live, live.client() as c, ThreadPoolExecutor(8) as pool:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        state = app.state.kronlink
        state.executor.submit(gate.wait, 30)  # the model thread is busy until the gate opens
        batcher = state.batchers["main"]
        first = pool.submit(c.post, "/v1/link", json=body)  # taken, waits for the thread
        # taken by the batcher: its batch sits in the busy model thread's queue
        wait_until(lambda: state.executor._work_queue.qsize() == 1 and batcher._waiting == 0)
        queued = [pool.submit(c.post, "/v1/link", json=body) for _ in range(4)]
        wait_until(lambda: batcher._waiting == 4)
        p = _problem(c.post("/v1/link", json=body), 429, "too-many-requests")
        assert p and "limit 4" in p["detail"]
        gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200] * 5
        assert 'kronlink_link_rejected_total{lineage="main"} 1.0' in c.get("/metrics").text
    reg.factory.kw["bind"].dispose()


# -- "no match" (issue 12, item 4) ----------------------------------------------
# temperature 2: the confidence is the top candidate's softmax at half the scores
CALIBRATED = {
    "test": {"accuracy": 0.5},
    "calibration": {"kind": "temperature", "params": {"t": 2.0}, "info": {}},
}


def _confidence_by_hand(results: list[dict]) -> float:
    import math

    z = [x["score"] / 2.0 for x in results]
    top = max(z)
    return 1.0 / sum(math.exp(v - top) for v in z)


@pytest.mark.parametrize("below", [0.0, 0.2, 0.999])
def test_link_reports_calibrated_confidence_and_no_match_below_the_setting(
    tmp_path, below: float
) -> None:
    reg = make_registry(service_settings(tmp_path, no_match_below=below))
    register_version(reg.factory, reg.store, seed=1, metrics=CALIBRATED)
    try:
        app = create_app(reg.settings, enqueue=reg.sent.append)
        with live_server(app) as live, live.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
            body = c.post("/v1/link", json={"mention": "t2dm", "candidates": CANDS}).json()
            conf = _confidence_by_hand(body["results"])
            assert body["confidence"] == pytest.approx(conf, rel=1e-6)
            assert 1 / 3 < conf < 0.999  # three candidates, none certain
            assert body["no_match"] is (conf < below)
            assert len(body["results"]) == 3  # still listed on a no-match
            # top_k cuts the list, not the evidence the confidence is made of
            one = c.post(
                "/v1/link", json={"mention": "t2dm", "candidates": CANDS, "top_k": 1}
            ).json()
            assert one["confidence"] == pytest.approx(conf, rel=1e-6)
            assert one["no_match"] is body["no_match"] and len(one["results"]) == 1
            batch = c.post(
                "/v1/link/batch",
                json={"items": [{"mention": "t2dm", "candidates": CANDS}] * 2},
            ).json()
            for item in batch["items"]:
                assert item["confidence"] == pytest.approx(conf, rel=1e-6)
                assert item["no_match"] is body["no_match"]
    finally:
        reg.factory.kw["bind"].dispose()


def test_a_version_without_calibration_serves_as_before_even_with_a_threshold(
    tmp_path,
) -> None:
    reg = make_registry(service_settings(tmp_path, no_match_below=0.999))
    register_version(reg.factory, reg.store, seed=1)  # metrics without "calibration"
    try:
        app = create_app(reg.settings, enqueue=reg.sent.append)
        with live_server(app) as live, live.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
            body = c.post("/v1/link", json={"mention": "t2dm", "candidates": CANDS}).json()
            assert body["confidence"] is None and body["no_match"] is False
            assert len(body["results"]) == 3
            schema = c.get("/openapi.json").json()["components"]["schemas"]
            assert {"confidence", "no_match"} <= set(schema["LinkResponse"]["properties"])
    finally:
        reg.factory.kw["bind"].dispose()


def test_no_match_below_must_be_a_probability(tmp_path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="no_match_below"):
        service_settings(tmp_path, no_match_below=1.5)


def test_an_unreadable_calibration_serves_without_one(caplog) -> None:
    """A version whose metrics hold a broken calibration still loads and serves
    (confidence null), and says so in the log; a good one is read as stored."""
    from dataclasses import replace as dc_replace
    from datetime import UTC, datetime

    from kronlink.registry import ArtifactInfo, VersionInfo, VersionState
    from service.holder import calibrator_of

    v = VersionInfo(
        id=3, lineage="main", number=2, parent_id=None, task_id=None,
        state=VersionState("active"), method="none", lambdas={},
        metrics={"calibration": {"kind": "platt", "params": {"a": 1.0}}},
        artifact=ArtifactInfo("file:///x", "0" * 64, 1), job_id=None,
        created_at=datetime.now(UTC), activated_at=None,
    )  # fmt: skip
    assert calibrator_of(v) is None
    assert "unreadable calibration" in caplog.text
    assert calibrator_of(dc_replace(v, metrics={})) is None
    good = calibrator_of(dc_replace(v, metrics=CALIBRATED))
    assert good is not None and good.kind == "temperature" and good.params == {"t": 2.0}


def test_each_ontology_is_answered_with_the_calibration_and_prior_fitted_on_it(tmp_path) -> None:
    """A version that learned "toy2" after "toy" serves "toy" with the
    calibration and retrieval prior carried from the version that learned toy
    (metrics["by_ontology"], as the worker writes it), not with toy2's."""
    import math

    # two candidates a query, both sharing words with the mention below, so
    # every candidate the calibration sees is served and the test can redo it
    reg = make_registry(service_settings(tmp_path, bm25_candidates=2))
    register_version(reg.factory, reg.store, seed=1)  # learned "toy"
    temps = {"toy": 2.0, "toy2": 0.5}
    metrics = {
        "test": {"accuracy": 0.5},
        "ontology": "toy2",
        "calibration": {"kind": "temperature", "params": {"t": 0.5}, "info": {}},
        "by_ontology": {
            "toy": {
                "calibration": {"kind": "temperature", "params": {"t": 2.0}, "info": {}},
                "retrieval_prior": {"beta": 1.0},
                "fitted_by_version": 1,
            },
            "toy2": {
                "calibration": {"kind": "temperature", "params": {"t": 0.5}, "info": {}},
                "retrieval_prior": None,
                "fitted_by_version": None,
            },
        },
    }
    # the same model and concepts under both names: only the records differ
    v2 = register_version(
        reg.factory, reg.store, seed=1, task="beta", ontology="toy2", metrics=metrics
    )
    try:
        app = create_app(reg.settings, enqueue=reg.sent.append)
        with live_server(app) as live, live.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
            mention = "type 2 diabetes"  # two candidates share its words
            bodies = {
                o: c.post("/v1/link", json={"mention": mention, "ontology": o}).json()
                for o in temps
            }
            assert {b["model_version"]["id"] for b in bodies.values()} == {v2.id}
            scores = {o: {x["id"]: x["score"] for x in b["results"]} for o, b in bodies.items()}
            assert sorted(scores["toy"]) == sorted(scores["toy2"]) == ["D001", "D002"]
            # toy's prior: beta * -log(1 + retriever rank), ranks 0 and 1
            gaps = sorted(scores["toy2"][i] - scores["toy"][i] for i in scores["toy"])
            assert gaps[0] == pytest.approx(0.0, abs=1e-5)  # the first candidate: -log 1
            assert gaps[1] == pytest.approx(math.log(2), rel=1e-4)
            for o, t in temps.items():
                z = [s / t for s in scores[o].values()]
                conf = 1.0 / sum(math.exp(v - max(z)) for v in z)
                assert bodies[o]["confidence"] == pytest.approx(conf, rel=1e-6), o
            # a caller's own candidates: the version's own calibration (toy2's)
            given = c.post("/v1/link", json={"mention": "t2dm", "candidates": CANDS}).json()
            z = [x["score"] / 0.5 for x in given["results"]]
            conf = 1.0 / sum(math.exp(v - max(z)) for v in z)
            assert given["confidence"] == pytest.approx(conf, rel=1e-6)
    finally:
        reg.factory.kw["bind"].dispose()


@pytest.mark.parametrize("t", [0.5, 4.0])
def test_the_exact_name_margin_is_in_calibrated_nats(tmp_path, t: float) -> None:
    """A model dev found t times overconfident (temperature t) gets a t times
    larger raw margin for an exact name; the same model without a
    calibration gets the margin as it is. Only the exact candidate moves."""
    reg = make_registry(service_settings(tmp_path, exact_margin=1.5, bm25_candidates=2))
    register_version(reg.factory, reg.store, seed=1, metrics={"test": {"accuracy": 0.5}})
    cal = {"kind": "temperature", "params": {"t": t}, "info": {}}
    by = {"toy2": {"calibration": cal, "retrieval_prior": None, "fitted_by_version": None}}
    register_version(
        reg.factory, reg.store, seed=1, task="beta", ontology="toy2",
        metrics={"test": {"accuracy": 0.5}, "by_ontology": by},
    )  # fmt: skip
    try:
        app = create_app(reg.settings, enqueue=reg.sent.append)
        with live_server(app) as live, live.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
            # "type 2 diabetes mellitus" is D001's name; D002 shares words
            body = {
                o: c.post(
                    "/v1/link", json={"mention": "type 2 diabetes mellitus", "ontology": o}
                ).json()
                for o in ("toy", "toy2")
            }
            score = {o: {x["id"]: x["score"] for x in b["results"]} for o, b in body.items()}
            assert sorted(score["toy"]) == ["D001", "D002"]
            assert score["toy2"]["D002"] == pytest.approx(score["toy"]["D002"], abs=1e-5)
            gap = score["toy2"]["D001"] - score["toy"]["D001"]
            assert gap == pytest.approx(1.5 * (t - 1.0), abs=1e-4)
    finally:
        reg.factory.kw["bind"].dispose()
