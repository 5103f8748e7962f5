"""What an operator's probe found (issue 16, items 1, 3, 4 and 6), over real HTTP:
options refused at submission, errors that name the real problem, protocol
details (405 Allow, 409 on a finished job, the OpenAPI document), the edge's
header and body limits, and a broker that is down answered at once."""

from __future__ import annotations

import gzip
import json
import socket
import time

import pytest
from service_factories import admin, free_port, live_server, make_registry, service_settings
from test_jobs_api import FORM, _files, _nothing_stored, _problem

from kronlink.registry import JobState, claim_job, finish_job, lineage_transaction, list_jobs
from service import create_app

CANDS = [{"id": "A", "name": "asthma"}, {"id": "F", "name": "fever"}]


# -- item 1: every option validated at submission ---------------------------------
@pytest.mark.parametrize("lam", ["-1", "nan", "inf", "-inf", "10,-2", "1e400"])
def test_lambda_must_be_finite_and_non_negative(lam: str, registry, server) -> None:
    with server.client() as c:
        r = c.post("/v1/jobs", data={**FORM, "lambda": lam}, files=_files(), headers=admin())
    p = _problem(r, 422, "validation-error")
    assert "λ values must be finite numbers >= 0" in p["detail"], p
    _nothing_stored(registry)


def test_options_the_worker_would_refuse_are_refused_at_once(registry, server) -> None:
    with server.client() as c:
        # a training option the update request refuses (TrainConfig checks its values)
        r = c.post(
            "/v1/jobs", data={**FORM, "train": '{"batch_size": 0}'}, files=_files(), headers=admin()
        )
    assert _problem(r, 422, "validation-error")
    _nothing_stored(registry)


# -- item 3: errors that say what is wrong ---------------------------------------------
def test_errors_name_the_real_problem(registry, server) -> None:
    body = {"mention": "fever", "candidates": CANDS}
    with server.client() as c:
        deep = "[" * 100_000 + "]" * 100_000
        r = c.post("/v1/link", content=deep, headers={"content-type": "application/json"})
        p = _problem(r, 400, "malformed-json")
        assert "nested too deeply" in p["detail"], p
        zipped = gzip.compress(json.dumps(body).encode())
        r = c.post(
            "/v1/link",
            content=zipped,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        p = _problem(r, 415, "unsupported-media-type")
        assert "compressed bodies are not accepted" in p["detail"], p
        for top_k in (True, "3", 2.0):
            r = c.post("/v1/link", json={**body, "top_k": top_k})
            p = _problem(r, 422, "validation-error")
            assert p["errors"][0]["loc"] == "body.top_k", p


def test_a_truncated_multipart_body_is_400(registry, server) -> None:
    files = _files()
    boundary = "b0undary"
    parts = []
    for name, (filename, content) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\n\r\n'.encode()
            + content
            + b"\r\n"
        )
    whole = b"".join(parts)  # ... and no closing --b0undary--
    with server.client() as c:
        r = c.post(
            "/v1/jobs?task=x",
            content=whole,
            headers={**admin(), "content-type": f"multipart/form-data; boundary={boundary}"},
        )
    p = _problem(r, 400, "validation-error")
    assert "truncated multipart body" in p["detail"], p
    _nothing_stored(registry)


def _raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def test_a_request_the_parser_refuses_gets_problem_json(server) -> None:
    status, headers, payload = _raw(
        server.url,
        b"POST /v1/link HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: -1\r\n\r\n{}",
    )
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert json.loads(payload)["type"] == "urn:kronlink:problem:malformed-request"


# -- item 4: protocol details --------------------------------------------------------
def test_405_lists_every_allowed_method(server) -> None:
    with server.client() as c:
        r = c.put("/v1/jobs", headers=admin())
        assert r.status_code == 405
        assert set(r.headers["allow"].split(", ")) >= {"GET", "POST"}, r.headers["allow"]
        r = c.post(f"/v1/jobs/{1}", headers=admin())
        assert set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}, r.headers["allow"]


def test_cancelling_a_finished_job_is_409_and_finished_jobs_have_no_phase(registry, server) -> None:
    with server.client() as c:
        r = c.post("/v1/jobs", data=FORM, files=_files(), headers=admin())
        job_id = r.json()["id"]
        with lineage_transaction(registry.factory, "main") as s:
            claim_job(s, job_id, owner="w", lease_s=60)
        with registry.factory.begin() as s:
            from kronlink.registry import update_progress

            update_progress(s, job_id, owner="w", phase="write", progress={"message": "write"})
            finish_job(s, job_id, JobState.SUCCEEDED, owner="w")
        p = _problem(c.delete(f"/v1/jobs/{job_id}", headers=admin()), 409, "conflict")
        assert "already succeeded" in p["detail"], p
        job = c.get(f"/v1/jobs/{job_id}", headers=admin()).json()
        assert job["state"] == "succeeded" and job["phase"] is None
        assert job["progress"]["ended_in"] == "write" and not job["cancel_requested"]
    with registry.factory.begin() as s:
        (row,) = list_jobs(s)
    assert not row.cancel_requested


def test_the_openapi_document_states_what_is_enforced(tmp_path) -> None:
    open_doc = create_app(service_settings(tmp_path)).openapi()
    link = open_doc["paths"]["/v1/link"]["post"]
    assert "security" not in link  # no read token configured: the read routes are open
    schemas = open_doc["components"]["schemas"]
    item = next(v for k, v in schemas.items() if k.startswith("LinkRequest"))
    required = [set(branch["required"]) for branch in item["oneOf"]]
    assert required == [{"candidates"}, {"ontology"}]
    form = open_doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["task"]["maxLength"] == 100
    closed = create_app(service_settings(tmp_path, read_token="r" * 20)).openapi()
    assert closed["paths"]["/v1/link"]["post"]["security"] == [{"ReadToken": []}]


def test_headers_over_the_limit_get_431(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, max_header_bytes=8192))
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live:
        big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
        status, headers, payload = _raw(
            live.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
        )
        assert status == 431 and headers["content-type"] == "application/problem+json"
        assert "KRONLINK_MAX_HEADER_BYTES" in json.loads(payload)["detail"]
        ok, _, _ = _raw(live.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok == 200
    reg.factory.kw["bind"].dispose()


def test_a_stalled_upload_is_dropped_with_408(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, body_timeout_s=1.0))
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(
                b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + admin()["Authorization"].split()[1].encode()
                + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b\r\n"
            )
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(65536):  # the server answers and closes: no sleep here
                data += chunk
            waited = time.monotonic() - t0
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"KRONLINK_BODY_TIMEOUT_S" in data
        assert 0.9 < waited < 10, waited
    # the half-received upload's folder went with the request
    staging = reg.settings.staging_path
    assert not staging.exists() or list(staging.iterdir()) == []
    reg.factory.kw["bind"].dispose()


# -- item 6: a broker that is down -----------------------------------------------------
def test_a_broker_that_is_down_answers_503_at_once(tmp_path) -> None:
    port = free_port()  # nothing listens there: Redis is down
    settings = service_settings(tmp_path, broker_url=f"redis://127.0.0.1:{port}/0")
    reg = make_registry(settings)
    with live_server(create_app(settings)) as live, live.client() as c:
        t0 = time.perf_counter()
        r = c.post("/v1/jobs", data=FORM, files=_files(), headers=admin())
        took = time.perf_counter() - t0
        p = _problem(r, 503, "unavailable")
        assert r.headers["retry-after"] == "5" and "submit again" in p["detail"]
    # main took about 6 s (connection retries); the bound leaves room for a loaded machine
    assert took < 1.5, f"POST /v1/jobs took {took:.2f} s with the broker down"
    with reg.factory.begin() as s:
        (job,) = list_jobs(s)  # kept: a worker's sweep re-sends it
    assert job.state == JobState.QUEUED
    reg.factory.kw["bind"].dispose()
