"""The lean /v1/link path (service/fastlink.py) answers exactly what the route
answers: the same JSON for every valid request, and every invalid one goes on
to the route (so its problem document is the route's)."""

from __future__ import annotations

import asyncio
import json

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
from test_link import CANDS, INVALID

import service.routes.link as link_route
from service import create_app
from service.fastlink import fast_link

VALID = [
    {"mention": "t2dm", "left_context": "hx of", "candidates": CANDS},
    {"mention": "t2dm", "candidates": CANDS, "top_k": 1},
    {"mention": "fever", "right_context": "and chills", "candidates": CANDS[:2], "top_k": None},
    {"mention": "juvenile diabetes", "ontology": "toy"},
    {"mention": "flu", "ontology": "toy"},  # nothing retrieved: no results, no_match
    {"mention": "high blood pressure", "ontology": "toy", "top_k": 2, "lineage": "main"},
    {"mention": "fièvre — ünïcode", "ontology": "toy", "candidates": None},
    {"mention": "asthma", "candidates": CANDS, "ontology": None, "lineage": None},
]

# accepted by neither side, or only by the route's own rules: the lean path passes them on
PASSED_ON = [body for _, body, *_ in INVALID] + [
    {"mention": "a", "candidates": CANDS, "top_k": True},
    {"mention": "a", "candidates": CANDS, "top_k": "3"},
    {"mention": "a", "candidates": CANDS, "top_k": 3.0},
    {"mention": "a", "candidates": CANDS, "top_k": 1001},
    {"mention": "a", "candidates": CANDS, "left_context": None},
    {"mention": None, "candidates": CANDS},
    {"mention": "a", "candidates": [{"id": 1, "name": "n"}]},
    {"mention": "a", "candidates": [{"id": "a", "name": None}]},
    {"mention": "a", "candidates": ["D001"]},
    {"mention": "a", "candidates": CANDS, "lineage": ""},
    {"mention": "\u200b\u200d", "candidates": CANDS},
    {"mention": "a", "ontology": ""},
    "a string",
    None,
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two servers of one registry: the lean path on (the default) and off."""
    reg = make_registry(service_settings(tmp_path_factory.mktemp("fast")))
    register_version(reg.factory, reg.store, seed=1)
    off = reg.settings.model_copy(update={"link_fast_path": False})
    with (
        live_server(create_app(reg.settings, enqueue=reg.sent.append)) as on_live,
        live_server(create_app(off, enqueue=reg.sent.append)) as off_live,
        on_live.client() as on,
        off_live.client() as off_c,
    ):
        for c in (on, off_c):
            wait_until(lambda c=c: c.get("/readyz").status_code == 200)
            # builds the ontology's index (the lean path uses a built one only)
            assert c.post("/v1/link", json={"mention": "x", "ontology": "toy"}).status_code == 200
        yield on, off_c, on_live.app
    reg.factory.kw["bind"].dispose()


def test_valid_requests_get_the_routes_answer(pair) -> None:
    on, off, _ = pair
    for body in VALID:
        a, b = on.post("/v1/link", json=body), off.post("/v1/link", json=body)
        assert a.status_code == b.status_code == 200, (body, a.text, b.text)
        assert a.headers["content-type"] == b.headers["content-type"] == "application/json"
        assert a.json() == b.json(), body


@pytest.mark.parametrize("body", PASSED_ON, ids=range(len(PASSED_ON)))
def test_invalid_requests_get_the_routes_problem(pair, body) -> None:
    on, off, _ = pair
    sent = json.dumps(body)
    a = on.post("/v1/link", content=sent, headers={"content-type": "application/json"})
    b = off.post("/v1/link", content=sent, headers={"content-type": "application/json"})
    assert a.status_code == b.status_code and a.status_code >= 400, (a.text, b.text)
    pa, pb = a.json(), b.json()
    assert pa.pop("request_id") != pb.pop("request_id")
    assert pa == pb
    assert a.headers["content-type"] == b.headers["content-type"] == "application/problem+json"


def test_the_lean_path_answers_without_the_route(pair, monkeypatch) -> None:
    """Counts the route's item builder: the lean path never calls it for a valid
    request; a request it passes on, and the path turned off, do."""
    on, off, _ = pair
    calls = []
    real = link_route._item

    async def counting(*args, **kwargs):
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(link_route, "_item", counting)
    for body in VALID:
        assert on.post("/v1/link", json=body).status_code == 200
    assert calls == []
    for body in VALID:
        assert off.post("/v1/link", json=body).status_code == 200
    assert len(calls) == len(VALID)


def test_unbuilt_ontology_unknown_lineage_and_bad_media_type_are_passed_on(pair) -> None:
    _, _, app = pair
    handle = fast_link(app.state.kronlink)
    json_type = {b"content-type": b"application/json"}

    def run(headers, body):
        return asyncio.run(handle(headers, json.dumps(body).encode()))

    assert run(json_type, {"mention": "a", "ontology": "not-built"}) is None
    assert run(json_type, {"mention": "a", "candidates": CANDS, "lineage": "other"}) is None
    assert run({b"content-type": b"text/plain"}, VALID[0]) is None
    assert run({}, VALID[0]) is None
    for body in PASSED_ON:
        assert run(json_type, body) is None, body


def test_read_token_on_the_lean_path(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, read_token=READ))
    register_version(reg.factory, reg.store, seed=1)
    handle = None
    with live_server(create_app(reg.settings)) as live, live.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        handle = fast_link(live.app.state.kronlink)
        body = json.dumps(VALID[0]).encode()
        for auth in (None, b"Bearer wrong-token-0123456789", b"bearer " + READ.encode(), READ):
            headers = {b"content-type": b"application/json"}
            if auth is not None:
                headers[b"authorization"] = auth if isinstance(auth, bytes) else auth.encode()
            assert asyncio.run(handle(headers, body)) is None, auth
        for token in (READ, ADMIN):
            r = c.post("/v1/link", json=VALID[0], headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["results"], r.text
        assert c.post("/v1/link", json=VALID[0]).status_code == 401
    reg.factory.kw["bind"].dispose()
