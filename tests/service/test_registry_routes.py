"""Versions, activation (promote, roll back, audit), tasks, ontologies, health and
metrics over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from service_factories import (
    ADMIN,
    admin,
    live_server,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

from kronlink.registry import AuditAction, list_audit, mark_version_failed
from service import create_app

CANDS = [{"id": "a", "name": "fever"}, {"id": "b", "name": "asthma"}]


def _served(c) -> int:
    return c.post("/v1/link", json={"mention": "x", "candidates": CANDS}).json()["model_version"][
        "number"
    ]


@pytest.mark.parametrize("registry", ["sqlite", "postgresql"], indirect=True)
def test_versions_activate_rollback_and_audit(registry, server) -> None:
    f, store = registry.factory, registry.store
    v1 = register_version(f, store, seed=1)
    v2 = register_version(f, store, seed=2, task="beta")
    v3 = register_version(f, store, seed=3, task="gamma", activate=False)
    with server.client() as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        wait_until(lambda: _served(c) == 2)
        listed = c.get("/v1/versions").json()
        assert [(v["number"], v["state"], v["served_here"]) for v in listed] == [
            (1, "retired", False),
            (2, "active", True),
            (3, "candidate", False),
        ]
        assert [v["number"] for v in c.get("/v1/versions?state=retired").json()] == [1]
        assert c.get("/v1/versions?lineage=other").json() == []
        one = c.get(f"/v1/versions/{v2.id}").json()
        assert one["metrics"] == {"test": {"accuracy": 0.5}} and one["task_id"] == v2.task_id
        assert c.get("/v1/versions/999").status_code == 404
        assert c.get("/v1/versions/0").status_code == 422
        assert c.get("/v1/versions/abc").status_code == 422
        assert c.get("/v1/versions?state=bogus").status_code == 422

        # promote the candidate: answered by v3 within the poll, this replica at once
        r = c.post(f"/v1/versions/{v3.id}/activate", json={"reason": "better"}, headers=admin())
        assert r.status_code == 200 and r.json()["state"] == "active"
        wait_until(lambda: _served(c) == 3, timeout_s=2)
        # roll back to v1 (no body), then to v2, which is still in memory
        r = c.post(f"/v1/versions/{v1.id}/activate", headers=admin())
        assert r.status_code == 200
        wait_until(lambda: _served(c) == 1, timeout_s=2)
        again = c.post(f"/v1/versions/{v1.id}/activate", headers=admin())
        assert again.status_code == 200  # activating the active one does nothing
        tasks = c.get("/v1/tasks").json()
        assert [(t["name"], t["ontology"]) for t in tasks] == [
            ("alpha", "toy"),
            ("beta", "toy"),
            ("gamma", "toy"),
        ]
        ontos = c.get("/v1/ontologies").json()
        assert [(o["name"], o["candidates_available"]) for o in ontos] == [("toy", True)]
    with f.begin() as s:
        actions = [(a.action, a.subject, a.actor) for a in list_audit(s) if a.actor == "api"]
        promoted = list_audit(s, subject=f"version:{v3.id}", action=AuditAction.PROMOTED)
    assert (AuditAction.PROMOTED.value, f"version:{v3.id}", "api") in actions
    assert (AuditAction.ROLLED_BACK.value, f"version:{v1.id}", "api") in actions
    assert promoted[0].details["reason"] == "better"


def test_activation_errors_and_admin_auth(registry, server) -> None:
    f, store = registry.factory, registry.store
    register_version(f, store, seed=1)
    bad = register_version(f, store, seed=2, task="beta", activate=False)
    with f.begin() as s:
        mark_version_failed(s, bad.id, error="gate", actor="test")
    with server.client() as c:
        url = f"/v1/versions/{bad.id}/activate"
        p = c.post(url, headers=admin())
        assert p.status_code == 409 and "failed" in p.json()["detail"]
        assert c.post("/v1/versions/77/activate", headers=admin()).status_code == 404
        assert c.post(url).status_code == 401
        wrong = c.post(url, headers={"Authorization": "Bearer " + "x" * 30})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"]
        extra = c.post(url, json={"reason": "x", "force": True}, headers=admin())
        assert extra.status_code == 422 and extra.json()["errors"][0]["loc"] == "body.force"
        assert c.post(url, json={"reason": 5}, headers=admin()).status_code == 422


def test_admin_routes_are_closed_without_an_admin_token(tmp_path) -> None:
    reg = make_registry(service_settings(tmp_path, admin_token=None))
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as live, live.client() as c:
        for method, url in (("GET", "/v1/jobs"), ("POST", "/v1/versions/1/activate")):
            r = c.request(method, url, headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 403 and "KRONLINK_ADMIN_TOKEN" in r.json()["detail"]
    reg.factory.kw["bind"].dispose()


def test_health_readiness_and_metrics(registry, server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503
        check = r.json()["checks"]
        assert r.json()["registry"]["ok"] and not check["model:main"]["ok"]
        assert "no version is active" in check["model:main"]["detail"]
        register_version(registry.factory, registry.store, seed=1)
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout_s=3)
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["checks"]["model:main"]["version"]["number"] == 1
        c.post("/v1/link", json={"mention": "x", "candidates": CANDS})
        c.post("/v1/link", json={"mention": ""})
        m = c.get("/metrics")
        assert m.headers["content-type"].startswith("text/plain")
        text = m.text
        for needle in (
            'kronlink_http_requests_total{method="POST",route="/v1/link",status="200"} 1.0',
            'kronlink_http_requests_total{method="POST",route="/v1/link",status="422"} 1.0',
            'kronlink_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/v1/link",status="200"}',
            'kronlink_link_batch_size_count{lineage="main"} 1.0',
            'kronlink_model_version{lineage="main"} 1.0',
            'kronlink_model_swaps_total{lineage="main"} 1.0',
            'kronlink_jobs{state="queued"} 0.0',
        ):
            assert needle in text, needle
