"""Versions, tasks and ontologies; activating a version (promote or roll back).

Plain ``def`` routes: the registry API is synchronous, so FastAPI runs them
in its thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query

from kronlink.errors import CheckpointError
from kronlink.notices import publishes
from kronlink.registry import (
    VersionState,
    activate_version,
    get_version,
    list_ontologies,
    list_tasks,
    list_versions,
)
from service.deps import AdminDep, ReaderDep, StateDep
from service.problems import ProblemError, problem_responses
from service.schemas import (
    MAX_DB_ID,
    ActivateRequest,
    OntologyOut,
    TaskOut,
    VersionOut,
)
from service.state import ServiceState

__all__ = ["router"]

router = APIRouter(tags=["registry"])

VersionId = Annotated[int, Path(ge=1, le=MAX_DB_ID, description="registry id of the version")]


def _served(state: ServiceState) -> set[int]:
    return {h.current.version.id for h in state.holders.values() if h.current is not None}


@router.get(
    "/v1/versions",
    response_model=list[VersionOut],
    responses=problem_responses(401, 422),
    summary="Model versions, by lineage and number",
)
def versions(
    state: StateDep,
    _: ReaderDep,
    lineage: Annotated[str | None, Query(max_length=100)] = None,
    version_state: Annotated[
        Literal["candidate", "active", "retired", "failed"] | None, Query(alias="state")
    ] = None,
) -> list[VersionOut]:
    with state.factory.begin() as s:
        rows = list_versions(s, lineage)
    served = _served(state)
    return [
        VersionOut.of(v, served)
        for v in rows
        if version_state is None or v.state == VersionState(version_state)
    ]


@router.get(
    "/v1/versions/{version_id}",
    response_model=VersionOut,
    responses=problem_responses(401, 404, 422),
    summary="One model version, with its metrics",
)
def version(version_id: VersionId, state: StateDep, _: ReaderDep) -> VersionOut:
    with state.factory.begin() as s:
        v = get_version(s, version_id)
    return VersionOut.of(v, _served(state))


@router.post(
    "/v1/versions/{version_id}/activate",
    response_model=VersionOut,
    responses=problem_responses(400, 401, 403, 404, 409, 422, 503),
    summary="Make a version active: promote a candidate or roll back to a retired one",
)
def activate(
    version_id: VersionId,
    state: StateDep,
    _: AdminDep,
    body: Annotated[ActivateRequest | None, Body()] = None,
) -> VersionOut:
    """The previous active version of the lineage retires; the audit log records
    who, when and why (``promoted`` or ``rolled_back``). Replicas swap to it
    within ``KRONLINK_MODEL_POLL_S`` (this one at once). A failed version
    cannot be activated (409), nor one whose stored files fail their sha256
    check (409 ``corrupt-artifact``, naming the files)."""
    reason = body.reason if body is not None else None
    actor = f"api:{body.by}" if body is not None and body.by else "api"
    _check_artifact(state, version_id)
    with state.factory.begin() as s:
        v = activate_version(s, version_id, actor=actor, reason=reason or "api")
    asyncio.run_coroutine_threadsafe(_after_activation(state, v.lineage, v.id), state.loop)
    return VersionOut.of(v, _served(state))


def _check_artifact(state: ServiceState, version_id: int) -> None:
    """Refuse to activate a version whose stored files no longer match their
    checksum: every replica would refuse to load it and keep serving the old
    one, while the registry said otherwise. Re-hashes the artifact (seconds
    for the largest models; activation is rare)."""
    with state.factory.begin() as s:
        v = get_version(s, version_id)
    if v.state in (VersionState.ACTIVE, VersionState.FAILED):
        return  # nothing changes, or activate_version refuses it
    try:
        state.store.verify(state.store.key_of(v.artifact.uri), v.artifact.sha256)
    except CheckpointError as exc:
        raise ProblemError(
            409,
            "corrupt-artifact",
            f"version {v.number} (id {v.id}) of lineage {v.lineage!r} was not activated: its "
            f"stored model is corrupt or incomplete: {exc}. Nothing changed; activate another "
            "version, or restore the files or re-run the job that produced it",
        ) from None
    except OSError as exc:
        raise ProblemError(
            503,
            "unavailable",
            f"version {v.number} (id {v.id}) was not activated: its artifact cannot be read "
            f"now ({type(exc).__name__}: {exc}); retry, or check the artifact store",
            headers={"Retry-After": "5"},
        ) from None


async def _after_activation(state: ServiceState, lineage: str, version_id: int) -> None:
    state.nudge()
    if publishes(state.settings.broker):
        from service.notify import publish

        await asyncio.to_thread(publish, state.settings.broker, lineage, version_id)


@router.get(
    "/v1/tasks",
    response_model=list[TaskOut],
    responses=problem_responses(401),
    summary="Tasks the models learned (names, sizes; never their data)",
)
def tasks(state: StateDep, _: ReaderDep) -> list[TaskOut]:
    with state.factory.begin() as s:
        names = {o.id: o.name for o in list_ontologies(s)}
        rows = list_tasks(s)
    return [TaskOut.of(t, names) for t in rows]


@router.get(
    "/v1/ontologies",
    response_model=list[OntologyOut],
    responses=problem_responses(401),
    summary="Registered ontologies (candidate generation sources)",
)
def ontologies(state: StateDep, _: ReaderDep) -> list[OntologyOut]:
    with state.factory.begin() as s:
        rows = list_ontologies(s)
    return [OntologyOut.of(o) for o in rows]
