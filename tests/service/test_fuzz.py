"""Property-based fuzzing driven by the OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid (schemathesis'
positive and negative modes), sent over HTTP to a live server with a served
version and the admin token. Checked on every answer: no 5xx, a status code
the document lists, a documented content type, and a body that matches the
documented schema. Bounded: a few dozen examples an operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_factories import (
    Registry,
    admin,
    live_server,
    make_registry,
    register_version,
    service_settings,
    wait_until,
)

from service import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 25


def _settings(tmp):
    return service_settings(tmp, max_upload_bytes=64 * 1024)


# The document depends only on settings (their limits), so it is read from an
# app that is never started; the server below is another app with the same settings.
schema = schemathesis.openapi.from_dict(
    create_app(_settings(Path("/nonexistent/kronlink"))).openapi()
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reg: Registry = make_registry(_settings(tmp_path_factory.mktemp("fuzz")))
    register_version(reg.factory, reg.store, seed=1)
    with live_server(create_app(reg.settings, enqueue=reg.sent.append)) as server:
        with server.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
        yield server.url
    reg.factory.kw["bind"].dispose()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure is reproducible
)
def test_api_holds_its_contract(case, live) -> None:
    case.call_and_validate(base_url=live, headers=admin(), checks=CHECKS)
