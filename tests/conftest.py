"""Suite-wide rule: under ``CI=true`` nothing may skip.

A test that needs a server, a browser, a package or a tool skips with its
reason on a developer's machine that lacks it; in CI the same skip would hide
a check that never ran, so it is turned into a failure carrying the reason
(``.ci/run`` exports CI=true and starts PostgreSQL and Redis first).
"""

from __future__ import annotations

import os

import pytest

CI = os.environ.get("CI", "").lower() == "true"


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (CI and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_skip(outcome.get_result())
