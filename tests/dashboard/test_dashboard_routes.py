"""The dashboard's HTML, fragment and JSON through HTTP (no browser): content, escaping, headers."""

from __future__ import annotations

import re

import pytest
from dashboard_factories import EVIL, LINEAGE, set_progress
from fastapi.testclient import TestClient

from kronlink.registry import create_job
from service.dashboard import make_dashboard_app
from service.dashboard.data import jobs_view, lineage_view


@pytest.fixture
def client(registry) -> TestClient:
    with TestClient(make_dashboard_app(registry.factory)) as c:
        yield c


def test_empty_registry_renders(client):
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert "No model version yet" in r.text
    assert "no jobs yet" in r.text
    assert client.get("/dashboard/state.json").json()["lineage"] is None


def test_page_shows_timeline_chart_jobs_and_escapes_upload_names(client, seeded):
    r = client.get("/dashboard")
    assert r.status_code == 200
    html = r.text
    # The picked lineage is the one activated last; v4 is active, v3 failed.
    assert re.search(r'id="active-version" data-version="4"', html)
    for n, state in ((1, "retired"), (2, "retired"), (3, "failed"), (4, "active")):
        assert re.search(rf'data-version="{n}" data-version-id="\d+" data-state="{state}"', html)
    assert 'id="matrix-chart"' in html and 'id="forgetting-chart"' in html
    assert "0.031" in html and "0.052" in html  # Ω of icd10cm at v2 and v4
    # The uploaded task name never reaches the page as markup.
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    # Rollback buttons for retired versions only, never for failed or active.
    buttons = re.findall(r'class="activate" data-version-id="\d+" data-version="(\d+)"', html)
    assert buttons == ["1", "2"]
    # The running job with its progress.
    assert re.search(r'<progress max="200" value="10">', html)
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]


def test_matrix_values(registry, seeded):
    with registry.factory() as s:
        view = lineage_view(s, LINEAGE)
    rows = {t.name: t for t in view.tasks}
    assert list(rows) == ["icd10cm", "hpo", EVIL, "mednorm"]
    icd = [(c.kind, c.value) if c else None for c in rows["icd10cm"].cells]
    assert icd == [
        ("learned", 0.62),
        ("forgetting", 0.031),
        ("forgetting", 0.09),
        ("forgetting", 0.052),
    ]
    assert rows["mednorm"].cells[:3] == (None, None, None)
    # v4 descends from v2, not from the failed v3: it never carried v3's task.
    assert [c and c.kind for c in rows[EVIL].cells] == [None, None, "learned", None]
    # Bytes: v4 adds its model and one state; the priors' states are shared, not new.
    v = {r.number: r for r in view.versions}
    assert v[4].state_bytes == 1000 + 2000 + 4000
    assert v[4].new_bytes == v[4].model_bytes + 4000
    assert v[2].parent_number == 1 and v[4].parent_number == 2
    assert v[4].lambdas == {"icd10cm": 1000.0, "hpo": 300.0}


def test_state_json_follows_progress(client, registry, seeded):
    s1 = client.get("/dashboard/state.json", params={"lineage": LINEAGE}).json()
    assert s1["active_version"]["number"] == 4
    running = [j for j in s1["jobs"] if j["state"] == "running"]
    assert [(j["id"], j["step"], j["phase"]) for j in running] == [
        (seeded.running_job_id, 10, "train")
    ]
    set_progress(registry.factory, seeded.running_job_id, step=150)
    s2 = client.get("/dashboard/state.json", params={"lineage": LINEAGE}).json()
    job = next(j for j in s2["jobs"] if j["id"] == seeded.running_job_id)
    assert (job["step"], job["fraction"], job["epoch"]) == (150, 0.75, 2)
    assert s2["fingerprint"] == s1["fingerprint"]
    # Payload fields other than the task name and method never leave the server.
    assert set(job) >= {"task", "method"} and "payload" not in job


def test_recent_jobs_are_bounded_but_live_ones_all_listed(registry, seeded):
    with registry.factory.begin() as s:
        for i in range(30):
            create_job(s, lineage="other", payload={"task_name": f"t{i}"}, idempotency_key=f"k{i}")
    with registry.factory() as s:
        rows = jobs_view(s, recent=3)
    states = [r.state for r in rows]
    assert states.count("queued") == 30 and states.count("running") == 1
    assert len(rows) == 30 + 1 + 3


def test_fragment_unknown_lineage_and_static(client, seeded):
    frag = client.get("/dashboard/lineage", params={"lineage": LINEAGE})
    assert frag.status_code == 200 and 'id="timeline"' in frag.text and "<html" not in frag.text
    assert client.get("/dashboard", params={"lineage": "nope"}).status_code == 404
    assert client.get("/dashboard", params={"lineage": "x" * 101}).status_code == 422
    js = client.get("/dashboard/static/dashboard.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/static/dashboard.css").status_code == 200
    assert client.get("/dashboard/static/..%2Froutes.py").status_code == 404
    assert client.get("/dashboard/static/routes.py").status_code == 404


def test_read_token_guards_every_piece_of_registry_data(registry, seeded, tmp_path):
    from kronlink.settings import Settings

    read, admin = "r" * 20, "a" * 20
    settings = Settings(data_dir=tmp_path / "d", read_token=read, admin_token=admin)
    with TestClient(make_dashboard_app(registry.factory, settings)) as c:
        page = c.get("/dashboard")
        # The page loads (a navigation cannot send a header) but carries no data.
        assert page.status_code == 200 and 'data-locked="1"' in page.text
        assert "mednorm" not in page.text and LINEAGE not in page.text
        for url in ("/dashboard/state.json", "/dashboard/lineage"):
            r = c.get(url, params={"lineage": LINEAGE})
            assert r.status_code == 401
            assert r.headers["content-type"].startswith("application/problem+json")
            assert (
                c.get(url, headers={"Authorization": "Bearer wrong-token-xxxxxxx"}).status_code
                == 401
            )
            for token in (read, admin):  # the admin token reads too
                ok = c.get(
                    url, params={"lineage": LINEAGE}, headers={"Authorization": f"Bearer {token}"}
                )
                assert ok.status_code == 200 and "mednorm" in ok.text
        # Sent with the page request (a proxy, curl), the token shows the data at once.
        full = c.get("/dashboard", headers={"Authorization": f"Bearer {read}"})
        assert 'data-locked=""' in full.text and "mednorm" in full.text


def _scale_text(html: str) -> tuple[str, str]:
    m = re.search(
        r'<abbr class="omega-scale" title="[^"]*" data-calibrated="(\w+)">([^<]*)</abbr>', html
    )
    assert m, "the Ω label is missing"
    return m.group(1), m.group(2)


def test_omega_label_comes_from_the_stored_calibration(client, seeded):
    """The active version (transformer, kfc) under the current rule: the stored
    record's fit fails, so Ω stays a relative risk score and the page says why,
    with the record's numbers, and shows no accuracy drop anywhere."""
    from kronlink.omega_scale import omega_reading, stored_calibration

    record = stored_calibration()
    assert record is not None, "results/curvature/omega_calibration.json is missing"
    fit = next(
        g
        for g in record["groups"]
        if (g["config"], g["ranker"], g["method"], g["rule"], g["measure"])
        == ("decisive", "transformer", "kfc", "split", "test_acc")
    )
    assert not fit["calibrated"]
    calibrated, label = _scale_text(client.get("/dashboard").text)
    assert calibrated == "false"
    assert label == omega_reading("transformer", "kfc")["label"]
    assert label.startswith("relative risk score (uncalibrated: rank correlation ")
    assert f"{fit['rho']:.2f}" in label and f"over {fit['n']} decisive runs" in label
    assert "omega-drop" not in client.get("/dashboard/lineage").text


def test_calibrated_record_shows_accuracy_drop(client, seeded, tmp_path, monkeypatch):
    """A record whose fit holds (written here: none of the stored ones does) turns
    each Ω cell into an expected accuracy drop with its range."""
    import json

    import kronlink.omega_scale as scale

    group = {
        "config": "decisive",
        "ranker": "transformer",
        "method": "kfc",
        "rule": "split",
        "measure": "test_acc",
        "unit": "points",
        "n": 60,
        "runs": 60,
        "rho": 0.8,
        "rho_ci": [0.7, 0.9],
        "ratio": {"q25": 10.0, "median": 20.0, "q75": 30.0, "n": 60},
        "calibrated": True,
        "why": "",
    }
    path = tmp_path / "omega_calibration.json"
    path.write_text(json.dumps({"format": scale.FORMAT, "groups": [group]}), encoding="utf-8")
    monkeypatch.setattr(scale, "DEFAULT_PATH", path)
    scale.stored_calibration.cache_clear()
    try:
        html = client.get("/dashboard").text
        calibrated, label = _scale_text(html)
        assert calibrated == "true"
        assert (
            label
            == "expected accuracy drop (calibrated: rank correlation 0.80 over 60 decisive runs)"
        )
        # icd10cm at v2: Ω 0.031 -> 20 x 0.031 = 0.62 points, quartiles 0.31 to 0.93.
        assert 'Ω 0.031<span class="omega-drop">: about 0.6 points (0.3 to 0.9)</span>' in html
    finally:
        scale.stored_calibration.cache_clear()


def test_api_version_carries_the_forgetting_scale(registry, seeded):
    """What /v1/versions returns per version (service.schemas.VersionOut)."""
    from kronlink.registry import list_versions
    from service.schemas import VersionOut

    with registry.factory() as s:
        versions = list_versions(s, LINEAGE)
    out = [VersionOut.of(v, set()).model_dump() for v in versions]
    scale = out[1]["forgetting_scale"]  # v2: kfc, transformer, Ω of icd10cm 0.031
    assert scale["calibrated"] is False and scale["ranker"] == "transformer"
    assert scale["label"].startswith("relative risk score (uncalibrated: rank correlation")
    assert scale["basis"]["config"] == "decisive" and scale["basis"]["n"] >= 20
    assert scale["failed"] and scale["accuracy_drop_points"] == {}
    # v1 trained with no penalty and no prior: no research runs to rest on.
    assert "no research runs" in out[0]["forgetting_scale"]["why"]


def test_a_version_card_says_what_its_retriever_is(client, registry, tmp_path) -> None:
    """A version made with retriever_tune shows its tower's dev recall change
    and how many earlier tasks it kept; a carried tower and the plain modes
    say so; a version recorded before the worker said shows nothing."""
    from kronlink.registry import (
        ArtifactInfo,
        add_task_state,
        create_ontology,
        create_task,
        create_version,
    )

    def fake_artifact(tag: str) -> ArtifactInfo:
        return ArtifactInfo(f"file:///artifacts/{tag}", "0" * 64, 123)

    tuned = {
        "tuned": True,
        "dev_recall_at": 10,
        "dev_recall_before": 0.62,
        "dev_recall_after": 0.712,
        "prior_tasks": 1,
    }
    cases = [
        (
            {"retriever_mode": "fused", "retriever": tuned},
            "fused, tower tuned: dev recall@10 0.620 → 0.712, 1 earlier task kept",
        ),
        (
            {"retriever_mode": "fused", "retriever": {"tuned": False, "carried": True}},
            "fused, tower carried from the parent",
        ),
        (
            {"retriever_mode": "fused", "retriever": {"tuned": False, "carried": False}},
            "fused, shipped encoder",
        ),
        ({"retriever_mode": "bm25"}, "bm25"),
        ({}, None),
    ]
    with registry.factory.begin() as s:
        onto = create_ontology(s, "o", source="upload", concept_count=3)
        task = create_task(s, "t", ontology_id=onto.id, sizes={})
        for n, (metrics, _) in enumerate(cases):
            v = create_version(
                s,
                lineage="towers",
                method="none",
                artifact=fake_artifact(f"m{n}"),
                task_id=task.id,
                metrics=metrics,
            )
            add_task_state(s, v.id, task.id, fake_artifact(f"s{n}"), tower=fake_artifact(f"r{n}"))
    html = client.get("/dashboard", params={"lineage": "towers"}).text
    shown = re.findall(r'<dd class="retriever">([^<]*)</dd>', html)
    assert shown == [want for _, want in cases if want is not None]
    with registry.factory.begin() as s:
        view = lineage_view(s, "towers")
    # a version's stored total counts its retriever state too (123 bytes each)
    assert all(v.state_bytes == 2 * 123 for v in view.versions)


def test_a_version_card_says_whose_calibration_each_ontology_gets(client, registry) -> None:
    from kronlink.registry import ArtifactInfo, create_ontology, create_task, create_version

    cal = {"kind": "temperature", "params": {"t": 2.0}, "info": {}}
    by = {
        "icd10cm": {"calibration": cal, "retrieval_prior": None, "fitted_by_version": 1},
        "hpo": {"calibration": cal, "retrieval_prior": None, "fitted_by_version": None},
        "toy": {"calibration": None, "retrieval_prior": None, "fitted_by_version": None},
    }
    with registry.factory.begin() as s:
        onto = create_ontology(s, "hpo", source="upload", concept_count=3)
        task = create_task(s, "hpo", ontology_id=onto.id, sizes={})
        for n, metrics in enumerate(({"by_ontology": by}, {})):
            create_version(
                s,
                lineage="calibrations",
                method="none",
                artifact=ArtifactInfo(f"file:///artifacts/c{n}", "0" * 64, 1),
                task_id=task.id,
                metrics=metrics,
            )
    html = client.get("/dashboard", params={"lineage": "calibrations"}).text
    # a version from before the records shows no line
    assert re.findall(r'<dd class="confidence">([^<]*)</dd>', html) == [
        "hpo calibrated here, icd10cm calibrated by v1, toy uncalibrated"
    ]
