"""``/healthz`` (the process answers), ``/readyz`` (it can serve), ``/metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from kronlink.registry import JobState
from kronlink.registry.models import Job
from service.deps import StateDep
from service.metrics import exposition
from service.schemas import HealthOut, ReadyCheck, ReadyOut, VersionRef
from service.state import ServiceState

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


def _model_check(state: ServiceState, lineage: str) -> ReadyCheck:
    h = state.holders[lineage]
    load_error = None
    if h.failure is not None:
        f = h.failure
        load_error = f"version {f.number} (id {f.version_id}) failed to load at {f.at.isoformat()}: {f.error}"
    if h.current is None:
        detail = (
            "no version is active in the registry yet (submit a job)"
            if h.active_id is None
            else f"version id {h.active_id} is active but not loaded yet"
        )
        return ReadyCheck(ok=False, detail=detail, load_error=load_error)
    v = h.current.version
    detail = None
    if h.active_id is not None and h.active_id != v.id:
        detail = f"version id {h.active_id} is active; still serving {v.number} until it loads"
    return ReadyCheck(ok=True, detail=detail, version=VersionRef.of(v), load_error=load_error)


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Not ready: see the failing checks"}},
    summary="Readiness: a model is loaded for every served lineage (the registry reported apart)",
)
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when this replica can answer ``/v1/link``: a loaded model for
    every served lineage. The registry database is reported in ``registry``
    but does not decide: loaded models keep answering while it is down, and a
    load balancer that pulled every replica for it would stop all linking."""
    db_error = await asyncio.to_thread(state.ping_database)
    checks = {f"model:{lineage}": _model_check(state, lineage) for lineage in state.holders}
    registry = ReadyCheck(
        ok=db_error is None,
        detail=db_error and f"{db_error}; admin and registry routes answer 503 meanwhile",
    )
    out = ReadyOut(ready=all(c.ok for c in checks.values()), checks=checks, registry=registry)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.ready else 503)


def _job_counts(state: ServiceState) -> dict[str, int]:
    with state.factory.begin() as s:
        rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {js.value: 0 for js in JobState}
    for st, n in rows:
        counts[str(getattr(st, "value", st))] = n
    return counts


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    try:
        counts = await asyncio.to_thread(_job_counts, state)
    except Exception:  # the database is down: serve the other metrics anyway
        counts = {}
    for name, n in counts.items():
        state.metrics.jobs.labels(name).set(n)
    return Response(exposition(state.metrics), media_type=CONTENT_TYPE_LATEST)
