"""POST/GET/DELETE /v1/jobs over real HTTP: streamed uploads, validation at once,
the job row and message exactly as ``kronlink submit`` makes them."""

from __future__ import annotations

import json
import os
import time

import pytest
from service_factories import ADMIN, admin, jsonl, live_server, make_registry, service_settings

from kronlink.contract import UpdateJobSpec
from kronlink.registry import AuditAction, JobState, list_audit, list_jobs
from service import create_app

ONTOLOGY = [
    {"id": "C1", "name": "fever", "synonyms": ["pyrexia"]},
    {"id": "C2", "name": "asthma"},
    {"id": "C3", "name": "migraine"},
]


def _queries() -> list[dict]:
    cands = [{"id": "C1", "name": "fever"}, {"id": "C2", "name": "asthma"}]
    out = []
    for split in ("train", "train", "dev", "test"):
        out.append({"mention": "high temp", "gold": "C1", "candidates": cands, "split": split})
    return out


def _files(queries=None, ontology=None) -> dict:
    return {
        "queries": ("queries.jsonl", jsonl(_queries() if queries is None else queries)),
        "ontology": ("ontology.jsonl", jsonl(ONTOLOGY if ontology is None else ontology)),
    }


FORM = {"task": "fevers", "method": "kfc", "lambda": "10", "epochs": "1", "train": '{"lr": 0.01}'}


def _problem(r, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == f"urn:kronlink:problem:{kind}"
    return body


def _nothing_stored(registry) -> None:
    with registry.factory.begin() as s:
        assert list_jobs(s) == []
    staging = registry.settings.staging_path
    assert not staging.exists() or list(staging.iterdir()) == []
    assert registry.sent == []


def test_submit_stages_creates_and_enqueues_once(registry, server) -> None:
    with server.client() as c:
        r = c.post("/v1/jobs", data=FORM, files=_files(), headers=admin())
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["state"] == "queued" and job["lineage"] == "main"
        assert job["options"]["lambdas"] == 10.0 and job["options"]["train"] == {
            "lr": 0.01,
            "epochs": 1,
        }
        assert "staged_id" not in job["options"]
        # the same files and options again: the same job, no second copy
        again = c.post("/v1/jobs", data=FORM, files=_files(), headers=admin())
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        got = c.get(f"/v1/jobs/{job['id']}", headers=admin()).json()
        assert got["id"] == job["id"] and got["version_id"] is None and got["metrics"] is None
    with registry.factory.begin() as s:
        (row,) = list_jobs(s)
        received = list_audit(s, subject=f"job:{row.id}", action=AuditAction.DATA_RECEIVED)
    spec = UpdateJobSpec.model_validate(row.payload)
    staged = registry.settings.staging_path / spec.staged_id
    assert sorted(p.name for p in staged.iterdir()) == [
        "ontology.jsonl",
        "queries.jsonl",
        "task.json",
    ]
    assert (staged / "queries.jsonl").read_bytes() == jsonl(_queries())
    assert [p.name for p in registry.settings.staging_path.iterdir()] == [spec.staged_id]
    assert spec.task_name == "fevers" and spec.method == "kfc"
    assert len(received) == 1 and received[0].actor == "api"
    assert [(m.job_id, m.lineage) for m in registry.sent] == [(row.id, "main")] * 2


BAD_DATASETS = [
    (
        "malformed line",
        [{"mention": "a"}],
        None,
        "queries.jsonl, line 1, field gold",
        "form.queries:1.gold",
    ),
    (
        "gold not among candidates",
        [
            {
                "mention": "a",
                "gold": "C3",
                "candidates": [{"id": "C1", "name": "fever"}],
                "split": "train",
            }
        ],
        None,
        "queries.jsonl, line 1, field gold",
        "form.queries:1.gold",
    ),
    ("empty ontology", None, [], "ontology.jsonl", "form.ontology"),
    (
        "duplicate concept",
        None,
        [{"id": "C1", "name": "a"}, {"id": "C1", "name": "b"}],
        "ontology.jsonl, line 2, field id",
        "form.ontology:2.id",
    ),
]


@pytest.mark.parametrize(
    ("queries", "ontology", "where", "loc"),
    [c[1:] for c in BAD_DATASETS],
    ids=[c[0] for c in BAD_DATASETS],
)
def test_an_invalid_dataset_is_refused_at_once_and_nothing_stays(
    registry, server, queries, ontology, where, loc
) -> None:
    with server.client() as c:
        r = c.post("/v1/jobs", data=FORM, files=_files(queries, ontology), headers=admin())
    p = _problem(r, 422, "invalid-dataset")
    assert where in p["detail"] and "nothing was stored" in p["detail"]
    assert p["errors"][0]["loc"] == loc
    assert str(registry.settings.staging_path) not in p["detail"]
    _nothing_stored(registry)


BAD_FORMS = [
    ("no task", {"method": "kfc"}, "form.task"),
    ("unknown method", {**FORM, "method": "replay"}, "form.method"),
    ("bad lambda", {**FORM, "lambda": "lots"}, "form.lambda"),
    ("train not JSON", {**FORM, "train": "{lr: 1}"}, "form.train"),
    ("train not an object", {**FORM, "train": "[1]"}, "form.train"),
    ("unknown train option", {**FORM, "train": '{"learning_rate": 1}'}, None),
    ("bad train value", {**FORM, "train": '{"warmup": 2}'}, None),
    ("unknown ranker", {**FORM, "ranker": '{"kind": "lstm"}'}, None),
    ("epochs zero", {**FORM, "epochs": "0"}, "form.epochs"),
    ("gate above one", {**FORM, "quality_gate": "2"}, "form.quality_gate"),
    ("unknown field", {**FORM, "colour": "red"}, "form.colour"),
]


@pytest.mark.parametrize(("form", "loc"), [c[1:] for c in BAD_FORMS], ids=[c[0] for c in BAD_FORMS])
def test_bad_options_are_refused_and_nothing_stays(registry, server, form, loc) -> None:
    with server.client() as c:
        r = c.post("/v1/jobs", data=form, files=_files(), headers=admin())
    p = _problem(r, 422, "validation-error")
    if loc is not None:
        assert p["errors"][0]["loc"] == loc, p
    _nothing_stored(registry)


def test_upload_shape_errors(registry, server) -> None:
    with server.client() as c:
        p = _problem(c.post("/v1/jobs", json=FORM, headers=admin()), 415, "unsupported-media-type")
        assert "multipart/form-data" in p["detail"]
        only = {"queries": _files()["queries"]}
        p = _problem(
            c.post("/v1/jobs", data=FORM, files=only, headers=admin()), 422, "validation-error"
        )
        assert p["errors"][0]["loc"] == "form.ontology"
        extra = {**_files(), "notes": ("n.txt", b"x")}
        _problem(
            c.post("/v1/jobs", data=FORM, files=extra, headers=admin()), 422, "validation-error"
        )
        garbage = c.post(
            "/v1/jobs",
            content=b"--xyz\r\nnot a header\r\n\r\n",
            headers={**admin(), "content-type": "multipart/form-data; boundary=xyz"},
        )
        # the body ends before its closing boundary: 400, as docs/service.md says
        p = _problem(garbage, 400, "validation-error")
        assert "truncated multipart body" in p["detail"] or "malformed" in p["detail"], p
        no_boundary = c.post(
            "/v1/jobs", content=b"x", headers={**admin(), "content-type": "multipart/form-data"}
        )
        _problem(no_boundary, 400, "validation-error")
    _nothing_stored(registry)


def test_a_file_over_the_limit_is_cut_off_with_413(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, max_upload_bytes=4096))
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live, live.client() as c:
        big = _queries() * 100  # about 15 kB

        body, headers = _multipart(FORM, _files(big))

        def stream():  # chunked, no Content-Length: the limit is enforced while streaming
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        p = _problem(
            c.post("/v1/jobs", content=stream(), headers={**admin(), **headers}),
            413,
            "payload-too-large",
        )
        assert "KRONLINK_MAX_UPLOAD_BYTES" in p["detail"]
        declared = c.post("/v1/jobs", content=body, headers={**admin(), **headers})
        _problem(declared, 413, "payload-too-large")
    _nothing_stored(reg)
    reg.factory.kw["bind"].dispose()


def _multipart(data: dict, files: dict) -> tuple[bytes, dict]:
    import httpx

    req = httpx.Request("POST", "http://x/", data=data, files=files)
    return req.read(), {"content-type": req.headers["content-type"]}


def test_list_get_cancel_and_auth(registry, server) -> None:
    with server.client() as c:
        ids = []
        for task in ("one", "two"):
            r = c.post("/v1/jobs", data={**FORM, "task": task}, files=_files(), headers=admin())
            ids.append(r.json()["id"])
        listed = c.get("/v1/jobs", headers=admin()).json()
        assert [j["id"] for j in listed] == ids[::-1]  # newest first
        assert [j["id"] for j in c.get("/v1/jobs?limit=1", headers=admin()).json()] == [ids[1]]
        cancelled = c.delete(f"/v1/jobs/{ids[0]}", headers=admin())
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        assert [j["id"] for j in c.get("/v1/jobs?state=queued", headers=admin()).json()] == [ids[1]]
        assert c.get("/v1/jobs?state=lost", headers=admin()).status_code == 422
        assert c.get("/v1/jobs?limit=0", headers=admin()).status_code == 422
        assert c.get("/v1/jobs/999", headers=admin()).status_code == 404
        assert c.delete("/v1/jobs/999", headers=admin()).status_code == 404
        for method, url in (
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/jobs/{ids[1]}"),
            ("DELETE", f"/v1/jobs/{ids[1]}"),
        ):
            assert c.request(method, url).status_code == 401
            wrong = {"Authorization": "Bearer " + ADMIN[:-1] + "!"}
            assert c.request(method, url, headers=wrong).status_code == 401
        assert c.post("/v1/jobs", data=FORM, files=_files()).status_code == 401
    with registry.factory.begin() as s:
        states = {j.id: j.state for j in list_jobs(s)}
    assert states == {ids[0]: JobState.CANCELLED, ids[1]: JobState.QUEUED}


def test_a_broker_failure_keeps_the_job_and_says_so(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path))

    def broken(message) -> None:
        raise ConnectionError("broker down")

    with live_server(create_app(reg.settings, enqueue=broken)) as live, live.client() as c:
        r = c.post("/v1/jobs", data=FORM, files=_files(), headers=admin())
        p = _problem(r, 503, "unavailable")
        assert "queued" in p["detail"] and r.headers["retry-after"]
    with reg.factory.begin() as s:
        (job,) = list_jobs(s)
    assert job.state == JobState.QUEUED  # the worker's sweep (or a resubmission) sends it
    staged = reg.settings.staging_path / job.payload["staged_id"]
    assert json.loads((staged / "task.json").read_text())["name"] == "fevers"
    reg.factory.kw["bind"].dispose()


def test_abandoned_upload_folders_are_swept_and_live_ones_kept(tmp_path) -> None:
    from service.uploads import sweep_uploads

    old, live = tmp_path / ".upload-old", tmp_path / ".upload-live"
    for folder in (old, live):
        folder.mkdir()
        (folder / "queries.jsonl").write_text("{}")
    past = time.time() - 7200
    for p in (old, old / "queries.jsonl"):
        os.utime(p, (past, past))
    assert sweep_uploads(tmp_path) == 1
    assert not old.exists() and live.exists()
