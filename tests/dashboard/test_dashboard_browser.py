"""The dashboard in a real browser: headless Debian Chromium driven by Playwright,
against a real uvicorn server on a free port over a seeded SQLite registry.

Checks the timeline, the chart, a running job's progress updating without a
reload, an escaped upload name that never runs, a rollback through the
dialog (wrong token refused, right token accepted) and the active version
changing on the page and in the registry. Saves a screenshot under tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from dashboard_factories import BASELINES, EVIL, JOB_SECONDS, LINEAGE, set_progress

from kronlink.registry import (
    AuditAction,
    active_version,
    list_audit,
    list_ontologies,
    list_task_states,
    list_versions,
)
from kronlink.settings import Settings

CHROMIUM = os.environ.get("KRONLINK_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium keeps calling hosts this machine cannot reach.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_TOKEN = "test-admin-token-0123456789"
READ_TOKEN = "test-read-token-0123456789"


def _need_browser() -> None:
    missing = [] if Path(CHROMIUM).exists() else [CHROMIUM]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        msg = f"the browser test needs {' and '.join(missing)} (make system-deps installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it", pytrace=False)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(registry, settings: Settings):
    """The whole service (``service.app.create_app``) over the test registry and store;
    its activate route is the one the dashboard calls. No broker: nothing is enqueued."""
    from service.app import create_app

    return create_app(
        settings, factory=registry.factory, store=registry.store, enqueue=lambda message: None
    )


@contextmanager
def running(app) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread; yields its base URL."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(registry, seeded, tmp_path) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path / "svc",
        admin_token=ADMIN_TOKEN,
        lineages=LINEAGE,
        replica_report_s=0.5,  # the serving panel fills within a second
    )
    with running(build_app(registry, settings)) as url:
        yield url


@pytest.fixture
def page(tmp_path: Path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"  # a fresh --user-data-dir per test
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            yield ctx.new_page()
        finally:
            ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_in_chromium(server, page, registry, seeded, tmp_path):
    from playwright.sync_api import expect

    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    page.goto(f"{server}/dashboard")
    page.evaluate("window.__notReloaded = true")

    # Timeline: four versions in order, v4 active, v3 failed, v1 the bootstrap.
    versions = page.locator("ol#timeline > li.version")
    assert versions.count() == 4
    assert [versions.nth(i).get_attribute("data-state") for i in range(4)] == [
        "retired",
        "retired",
        "failed",
        "active",
    ]
    assert page.locator("ol#timeline > li.active").get_attribute("data-version") == "4"
    v4 = page.locator('li.version[data-version="4"]')
    assert "mednorm" in v4.inner_text() and "v2" in v4.inner_text()  # task added, parent
    assert "icd10cm: 1000" in v4.inner_text() and "hpo: 300" in v4.inner_text()
    assert "job #" in v4.inner_text() and "KiB" in v4.inner_text()
    # The upload's HTML-looking task name shows as text and runs nothing.
    assert page.locator('li.version[data-version="3"] dd.task').inner_text() == EVIL
    assert page.locator("ol#timeline img").count() == 0

    # The chart: one cell per (task, version since it was learned), drawn and visible.
    chart = page.locator("#matrix-chart")
    assert chart.is_visible() and chart.bounding_box()["width"] > 300
    assert page.locator("#matrix-chart g.cell").count() == 4 + 3 + 1 + 1
    icd_v2 = page.locator('#matrix-chart g.cell[data-task="icd10cm"][data-version="2"] text')
    assert icd_v2.text_content() == "0.031"
    assert page.locator("#forgetting-chart polyline").count() >= 2

    # Each accuracy beside its baselines; versions without them say so.
    v2_acc = page.locator('li.version[data-version="2"] dd.accuracy').inner_text()
    assert v2_acc.startswith("0.710") and "bm25 0.412" in v2_acc
    assert "retriever 0.503 (R@10 0.810)" in v2_acc
    v1_acc = page.locator('li.version[data-version="1"] dd.accuracy').inner_text()
    assert "no baseline recorded" in v1_acc and set(BASELINES) == {2, 4}
    # Ω is labelled with its scale from the stored calibration: for the active
    # version (transformer, kfc) the fit fails, so a relative risk score and why.
    from kronlink.omega_scale import omega_reading

    scale = page.locator("abbr.omega-scale")
    assert scale.inner_text() == omega_reading("transformer", "kfc")["label"]
    assert scale.inner_text().startswith("relative risk score (uncalibrated: rank correlation")
    assert scale.get_attribute("data-calibrated") == "false"
    assert page.locator(".omega-drop").count() == 0

    # Storage: the total is the sum of its parts and of what each version added,
    # and matches the registry's artifacts counted once each.
    storage = page.locator("#storage")
    parts = {k: int(storage.get_attribute(f"data-{k}")) for k in ("models", "states", "ontologies")}
    total = int(storage.get_attribute("data-total"))
    new = [int(versions.nth(i).get_attribute("data-new-bytes")) for i in range(4)]
    assert total == sum(parts.values()) == sum(new) + parts["ontologies"]
    with registry.factory() as s:
        vs = list_versions(s, LINEAGE)
        arts = {v.artifact.uri: v.artifact.bytes for v in vs}
        for v in vs:
            arts |= {t.artifact.uri: t.artifact.bytes for t in list_task_states(s, v.id)}
        ontos = sum(o.artifact.bytes for o in list_ontologies(s) if o.artifact)
    assert total == sum(arts.values()) + ontos and parts["ontologies"] == ontos > 0

    # Finished jobs show how long they ran.
    first_job = page.locator("#jobs-body tr.state-succeeded").last
    assert first_job.locator("td.duration").inner_text() == f"1 min {JOB_SECONDS + 1 - 60:02d} s"

    # Serving: this replica reports the version it serves and its request figures.
    replica = page.locator("#serving-body tr.replica")
    expect(replica).to_have_count(1, timeout=8000)
    expect(replica.locator("td").nth(1)).to_have_text(f"{LINEAGE}: v4")
    expect(replica.locator("td.rate")).not_to_have_text("—", timeout=8000)

    # A running job's progress follows the job row without a reload.
    bar = page.locator(f'tr[data-job-id="{seeded.running_job_id}"] progress')
    assert bar.get_attribute("value") == "10"
    set_progress(registry.factory, seeded.running_job_id, step=120)
    # (expect, not wait_for_function: the page's CSP forbids the eval the latter uses)
    expect(bar).to_have_js_property("value", 120, timeout=8000)
    row = page.locator(f'tr[data-job-id="{seeded.running_job_id}"]').inner_text()
    assert "120/200" in row and "train" in row

    # Roll back to v2: the dialog warns what is forgotten, asks why and for the
    # token; no reason, or a wrong token, is refused.
    page.locator('button.activate[data-version="2"]').click()
    dialog = page.locator("#activate-dialog")
    assert dialog.is_visible()
    assert "now v4" in page.locator("#activate-text").inner_text()
    warning = page.locator("#activate-warning")
    assert warning.is_visible() and "Rolling back to v2 forgets mednorm" in warning.inner_text()
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#activate-confirm")
    expect(page.locator("#activate-error")).to_have_text(re.compile("reason"))
    with registry.factory() as s:
        assert active_version(s, LINEAGE).number == 4
    page.fill("#activate-reason", "mednorm answers rejected by the coding team")
    page.fill("#activate-by", "dr. ops")
    page.fill("#admin-token", "wrong")
    page.click("#activate-confirm")
    expect(page.locator("#activate-error")).to_have_text(re.compile("401|token"))
    with registry.factory() as s:
        assert active_version(s, LINEAGE).number == 4
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#activate-confirm")
    page.wait_for_selector('#active-version[data-version="2"]', timeout=8000)
    assert not dialog.is_visible()
    assert page.locator("ol#timeline > li.active").get_attribute("data-version") == "2"
    with registry.factory() as s:
        assert active_version(s, LINEAGE).number == 2
        (audit,) = list_audit(s, action=AuditAction.ROLLED_BACK)
    assert (audit.actor, audit.details["reason"]) == (
        "api:dr. ops",
        "mednorm answers rejected by the coding team",
    )
    # The history names who, when and why, newest first.
    newest = page.locator("#history tbody tr").first.inner_text()
    assert "rolled back to v2 (replacing v4)" in newest
    assert "dr. ops" in newest and "mednorm answers rejected" in newest
    assert page.locator("#history tr.promoted").count() == 3  # v1, v2 and v4 by their jobs
    # The service behind the page swapped its model to v2.
    deadline = time.monotonic() + 10
    while True:
        served = [
            v["number"]
            for v in httpx.get(f"{server}/v1/versions", params={"lineage": LINEAGE}).json()
            if v["served_here"]
        ]
        if served == [2] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert served == [2]
    # The API says how to read Ω the same way the page does.
    listed = httpx.get(f"{server}/v1/versions", params={"lineage": LINEAGE}).json()
    v2 = next(v for v in listed if v["number"] == 2)
    assert v2["forgetting_scale"]["label"] == omega_reading("transformer", "kfc")["label"]
    assert v2["forgetting_scale"]["calibrated"] is False
    # The matrix header marks the new active version.
    assert "●" in page.locator('#matrix-chart text.col-head[data-version="2"]').text_content()
    expect(replica.locator("td").nth(1)).to_have_text(f"{LINEAGE}: v2", timeout=8000)
    # /v1/link traffic shows as latency quantiles at the next report
    cands = [{"id": "D1", "name": "fever"}, {"id": "D2", "name": "cough"}]
    with httpx.Client(base_url=server) as c:
        for _ in range(20):
            body = {"mention": "pyrexia", "candidates": cands, "lineage": LINEAGE}
            assert c.post("/v1/link", json=body).status_code == 200
    expect(replica.locator("td").nth(5)).to_have_text(re.compile(r"^\d+\.\d ms$"), timeout=8000)

    assert page.evaluate("window.__notReloaded") is True
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # KRONLINK_DASHBOARD_SCREENSHOT=docs/img/dashboard.png refreshes the docs' picture
    if os.environ.get("KRONLINK_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["KRONLINK_DASHBOARD_SCREENSHOT"])
    assert dialogs == [], f"the page opened dialogs (injected script ran?): {dialogs}"
    # Failed fetches of the wrong-token attempt log "401" console errors; nothing else may.
    assert [e for e in errors if "401" not in e] == []


def test_read_token_unlocks_the_page(page, registry, seeded, tmp_path):
    from playwright.sync_api import expect

    settings = Settings(
        data_dir=tmp_path / "svc", admin_token=ADMIN_TOKEN, read_token=READ_TOKEN, lineages=LINEAGE
    )
    with running(build_app(registry, settings)) as url:
        page.goto(f"{url}/dashboard")
        expect(page.locator("#unlock-form")).to_be_visible()
        assert page.locator("ol#timeline").count() == 0
        page.fill("#read-token", "not-the-token-123456")
        page.click("#unlock-form button[type=submit]")
        expect(page.locator("#unlock-error")).to_have_text("That token was refused.")
        page.fill("#read-token", READ_TOKEN)
        page.click("#unlock-form button[type=submit]")
        expect(page.locator("ol#timeline > li.active")).to_have_attribute("data-version", "4")
        expect(page.locator("#unlock-form")).to_be_hidden()
        expect(page.locator(f'tr[data-job-id="{seeded.running_job_id}"]')).to_be_visible()
        assert f"lineage={LINEAGE}" in page.url
