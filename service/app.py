"""The app factory.

    app = create_app(settings)                    # tests, embedding
    uvicorn --factory service.app:app_from_env    # settings from KRONLINK_*
    kronlink serve                                # the same, with logging set up

Nothing is built at import time: the database engine, the artifact store, the
models and the batching loops start with the app's lifespan and stop with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateMessage
from kronlink.registry import ArtifactStore
from kronlink.settings import Settings, get_settings
from service.dashboard import router as dashboard_router
from service.fastlink import fast_link
from service.logs import configure_logging
from service.middleware import RequestMiddleware
from service.problems import PROBLEM_JSON, FieldError, Problem, install_handlers
from service.routes import health, jobs, registry
from service.routes.link import link_router
from service.state import ServiceState

__all__ = ["app_from_env", "create_app"]

API_VERSION = "1"


def create_app(
    settings: Settings | None = None,
    *,
    factory: sessionmaker[Session] | None = None,
    store: ArtifactStore | None = None,
    enqueue: Callable[[UpdateMessage], None] | None = None,
) -> FastAPI:
    """The kronlink service for ``settings`` (default: the environment's).

    ``factory``, ``store`` and ``enqueue`` replace the registry session
    factory, the artifact store and the broker producer built from settings.
    """
    settings = settings or get_settings()
    state = ServiceState(settings, factory=factory, store=store, enqueue=enqueue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="kronlink",
        version=API_VERSION,
        summary="Medical entity linking that learns new ontologies without forgetting",
        description=(
            "Rank ontology concepts for a mention (`/v1/link`), submit update jobs "
            "with new datasets, and promote or roll back model versions. Errors are "
            "RFC 9457 problem documents (`application/problem+json`). "
            "docs/service.md is the guide."
        ),
        lifespan=lifespan,
    )
    app.state.kronlink = state
    install_handlers(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=state.metrics,
        max_body=settings.max_request_bytes,
        streams_body=lambda method, path: method == "POST" and path == "/v1/jobs",
        fast_link=(lambda: fast_link(state) if state.batchers else None)
        if settings.link_fast_path
        else None,
    )
    app.include_router(link_router(settings))
    app.include_router(jobs.router)
    app.include_router(registry.router)
    app.include_router(health.router)
    app.include_router(dashboard_router)
    app.openapi = lambda: _openapi(app, read_token=settings.read_token is not None)  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory`` and ``kronlink serve``: the entry point of a
    server process, so it sets up the process's logging (format and level
    from ``KRONLINK_LOG_FORMAT`` and ``KRONLINK_LOG_LEVEL``)."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level.upper())
    return create_app(settings)


def _openapi(app: FastAPI, *, read_token: bool) -> dict[str, Any]:
    """FastAPI's document, with every error as ``application/problem+json``;
    the read routes name their token only when this server sets one."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/Problem"
    for model in (FieldError, Problem):
        schemas[model.__name__] = model.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    problem = {PROBLEM_JSON: {"schema": {"$ref": ref}}}
    for path in doc.get("paths", {}).values():
        for op in path.values():
            if not read_token and "security" in op:
                op["security"] = [r for r in op["security"] if "ReadToken" not in r]
                if not op["security"]:
                    del op["security"]
            responses = op.setdefault("responses", {})
            for code, resp in responses.items():
                content = resp.get("content", {})
                schema = content.get("application/json", {}).get("schema", {})
                if schema.get("$ref", "").endswith(("/Problem", "/HTTPValidationError")):
                    resp["content"] = problem
                    if code == "422":
                        resp["description"] = "Invalid request: field errors"
            responses.setdefault("default", {"description": "Error", "content": problem})
    app.openapi_schema = doc
    return doc
