"""``POST /v1/link`` and ``POST /v1/link/batch``: rank candidate concepts for mentions."""

# No ``from __future__ import annotations`` here: the body types are built per
# app (their limits come from settings) and FastAPI must see them as objects.

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from kronlink.data.schema import Candidate
from kronlink.registry import VersionInfo
from kronlink.settings import Settings
from service.batching import LinkItem
from service.deps import ReaderDep, StateDep
from service.problems import FieldError, ProblemError, problem_responses
from service.schemas import LinkBatchResponse, LinkResponse, link_request_models
from service.state import ServiceState

__all__ = ["link_router"]


def _ref(v: VersionInfo) -> dict[str, Any]:
    """``VersionRef`` as a dict: the hot path returns built JSON, skipping a
    second validation of a response the code has just made (the schema in
    the OpenAPI document is still ``LinkResponse``; the tests check it)."""
    return {"id": v.id, "lineage": v.lineage, "number": v.number}


def _lineage(state: ServiceState, name: str | None, loc: str) -> str:
    served = state.settings.lineage_names
    if name is None:
        return served[0]
    if name not in state.batchers:
        raise ProblemError(
            422,
            "validation-error",
            f"lineage {name!r} is not served here; served: {', '.join(served)}",
            errors=[FieldError(loc=loc, message="lineage not served")],
        )
    return name


async def _item(state: ServiceState, body: Any, loc: str) -> LinkItem:
    if body.candidates is not None:
        cands = tuple(Candidate(c.id, c.name) for c in body.candidates)
        index = None
    else:
        cands = None
        index = await state.ontologies.get(body.ontology, f"{loc}.ontology")
    return LinkItem(
        mention=body.mention,
        left_context=body.left_context,
        right_context=body.right_context,
        candidates=cands,
        index=index,
        k=state.settings.bm25_candidates,
        top_k=body.top_k,
    )


def link_router(settings: Settings) -> APIRouter:
    models = link_request_models(settings)
    LinkRequest, LinkBatchRequest = models.LinkRequest, models.LinkBatchRequest
    router = APIRouter(tags=["link"])
    errors = problem_responses(400, 401, 413, 422, 429, 503)

    @router.post(
        "/v1/link",
        response_model=LinkResponse,
        responses=errors,
        summary="Rank candidate concepts for one mention",
    )
    async def link(body: LinkRequest, state: StateDep, _: ReaderDep) -> JSONResponse:  # type: ignore[valid-type]
        """Rank the given candidates, or the top BM25 candidates of a registered
        ontology when none are given. Concurrent requests are batched together;
        the answer names the model version that produced it."""
        lineage = _lineage(state, body.lineage, "body.lineage")
        item = await _item(state, body, "body")
        version, ranked = await state.batchers[lineage].submit([item])
        return JSONResponse({"model_version": _ref(version), **ranked[0].fields()})

    @router.post(
        "/v1/link/batch",
        response_model=LinkBatchResponse,
        responses=errors,
        summary="Rank candidate concepts for several mentions (one model version)",
    )
    async def link_batch(body: LinkBatchRequest, state: StateDep, _: ReaderDep) -> JSONResponse:  # type: ignore[valid-type]
        """Like /v1/link for each item, in one model call when they fit in a batch;
        every item is answered by the same version."""
        lineage = _lineage(state, body.lineage, "body.lineage")
        items = [await _item(state, it, f"body.items[{i}]") for i, it in enumerate(body.items)]
        version, ranked = await state.batchers[lineage].submit(items)
        return JSONResponse({"model_version": _ref(version), "items": [r.fields() for r in ranked]})

    return router
