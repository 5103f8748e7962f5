"""Request and response bodies (they are the OpenAPI document's schemas).

Link request limits come from settings (``max_mention_chars`` ...), so the
request models are built per app by :func:`link_request_models`: the
document then states the limits the server enforces. Everything else is
fixed here.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kronlink.omega_scale import omega_reading
from kronlink.registry import JobInfo, OntologyInfo, TaskInfo, VersionInfo
from kronlink.settings import Settings

__all__ = [
    "ActivateRequest",
    "JobOut",
    "LinkBatchResponse",
    "LinkRequestModels",
    "LinkResponse",
    "OntologyOut",
    "RankedConcept",
    "TaskOut",
    "VersionOut",
    "VersionRef",
    "link_request_models",
    "valid_text",
]

MAX_ID_CHARS = 200
MAX_NAME_CHARS = 1000
MAX_LABEL_CHARS = 100  # lineage, ontology, task names
MAX_TOP_K = 1000
MAX_DB_ID = 2**31 - 1  # ids are 32-bit integers in the registry


def valid_text(value: str) -> str:
    """Refuse unpaired surrogates: no tokenizer or UTF-8 encoder accepts them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "contains an unpaired surrogate code point (\\ud800-\\udfff); send valid Unicode"
        ) from None
    return value


def _nonblank(value: str) -> str:
    # Zero-width spaces, joiners, direction marks and NULs are not spaces to
    # str.strip, but a mention of nothing else has nothing to rank by.
    if all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        raise ValueError(
            "expected at least one visible character, got only spaces, control or "
            "format characters (zero-width spaces, direction marks)"
        )
    return value


Text = Annotated[str, AfterValidator(valid_text)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS), AfterValidator(valid_text)]


# -- /v1/link ------------------------------------------------------------------
class VersionRef(BaseModel):
    """The model version that produced an answer."""

    id: int = Field(description="registry id (GET /v1/versions/{id})")
    lineage: str
    number: int = Field(description="1, 2, ... within the lineage")

    @classmethod
    def of(cls, v: VersionInfo) -> VersionRef:
        return cls(id=v.id, lineage=v.lineage, number=v.number)


class RankedConcept(BaseModel):
    id: str
    name: str
    score: float = Field(description="the ranker's raw score")
    probability: float = Field(description="softmax of the scores over this query's candidates")
    rank: int = Field(ge=1, description="1 is the best")


_CONFIDENCE = (
    "the served version's calibrated probability that the top result is right, fitted "
    "on its dev split with queries whose right concept was not among the candidates "
    "counted as wrong (docs/service.md, 'No match'); null for a version without one"
)
_NO_MATCH = (
    "true when confidence is below the service's no_match_below setting: the right "
    "concept is probably not among the results. The results are still listed, best "
    "first, as suggestions; do not take results[0] as the answer. Also true when the "
    "model's top candidate was one the ontology's retriever had no evidence for (no "
    "word shared with the mention): such candidates are never listed, and results is "
    "empty when the retriever found nothing (check the spelling, or send candidates)"
)


class LinkResponse(BaseModel):
    model_version: VersionRef
    results: list[RankedConcept] = Field(description="best first")
    confidence: float | None = Field(description=_CONFIDENCE)
    no_match: bool = Field(description=_NO_MATCH)


class LinkBatchResult(BaseModel):
    results: list[RankedConcept]
    confidence: float | None = Field(description=_CONFIDENCE)
    no_match: bool = Field(description=_NO_MATCH)


class LinkBatchResponse(BaseModel):
    model_version: VersionRef = Field(description="one version answers the whole batch")
    items: list[LinkBatchResult] = Field(description="in the order of the request's items")


_CANDIDATES_XOR_ONTOLOGY = {
    "oneOf": [
        {"required": ["candidates"], "not": {"required": ["ontology"]}},
        {"required": ["ontology"], "not": {"required": ["candidates"]}},
    ]
}


@dataclass(frozen=True)
class LinkRequestModels:
    Candidate: type[BaseModel]
    LinkItem: type[BaseModel]
    LinkRequest: type[BaseModel]
    LinkBatchRequest: type[BaseModel]


def link_request_models(settings: Settings) -> LinkRequestModels:
    """The link request bodies with this app's limits."""
    ctx = Annotated[str, Field(max_length=settings.max_context_chars), AfterValidator(valid_text)]

    class Candidate(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(valid_text)]
        name: Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(valid_text)]

    class LinkItem(BaseModel):
        """One mention to link: give its candidates, or an ontology to find them in."""

        # the document states what _source enforces: exactly one of the two
        model_config = ConfigDict(extra="forbid", json_schema_extra=_CANDIDATES_XOR_ONTOLOGY)
        mention: Annotated[
            str,
            Field(min_length=1, max_length=settings.max_mention_chars),
            AfterValidator(valid_text),
            AfterValidator(_nonblank),
        ]
        left_context: ctx = ""
        right_context: ctx = ""
        candidates: (
            Annotated[
                list[Candidate],
                Field(min_length=1, max_length=settings.max_candidates),
            ]
            | None
        ) = Field(default=None, description="concepts to rank; omit to generate them by BM25")
        ontology: Label | None = Field(
            default=None,
            description=f"registered ontology to generate {settings.bm25_candidates} "
            "candidates from (BM25 over names and synonyms), when candidates are omitted",
        )
        top_k: int | None = Field(
            default=None,
            ge=1,
            le=MAX_TOP_K,
            strict=True,  # true and "3" are not counts
            description="return the best k; default all",
        )

        @model_validator(mode="after")
        def _source(self) -> LinkItem:
            if self.candidates is None and self.ontology is None:
                raise ValueError(
                    "give candidates, or an ontology to generate them from (GET /v1/ontologies)"
                )
            if self.candidates is not None and self.ontology is not None:
                raise ValueError("give candidates or an ontology, not both")
            if self.candidates is not None:
                seen: set[str] = set()
                for i, c in enumerate(self.candidates):
                    if c.id in seen:
                        raise ValueError(f"candidates[{i}].id {c.id!r} repeats an earlier id")
                    seen.add(c.id)
            return self

    class LinkRequest(LinkItem):
        lineage: Label | None = Field(
            default=None,
            description=f"served lineage; default {settings.lineage_names[0]!r}",
        )

    class LinkBatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: Annotated[list[LinkItem], Field(min_length=1, max_length=settings.max_batch_items)]
        lineage: Label | None = Field(
            default=None,
            description=f"served lineage; default {settings.lineage_names[0]!r}",
        )

    return LinkRequestModels(Candidate, LinkItem, LinkRequest, LinkBatchRequest)


# -- registry ------------------------------------------------------------------
class ForgettingScale(BaseModel):
    """How to read ``metrics.predicted_forgetting`` (½Ω, nats per query of each
    prior task's loss), from the stored calibration (docs/curvature.md)."""

    calibrated: bool = Field(
        description="the research runs' fit holds for this ranker and method: Ω reads as "
        "an expected accuracy drop; false: Ω is a relative risk score only"
    )
    label: str = Field(description="what Ω is, in words, with the reason when uncalibrated")
    why: str = Field(description="the fit it rests on, or why there is none; '' when calibrated")
    failed: str = Field(default="", description="the calibration criteria the fit missed")
    ranker: str | None = Field(description="the ranker kind the version records, if any")
    rule: str = Field(description="the curvature rule the forecast is computed under")
    basis: dict[str, Any] | None = Field(
        default=None, description="config, n, rank correlation and its interval, ratio quartiles"
    )
    accuracy_drop_points: dict[str, dict[str, float]] = Field(
        description="per prior task: expected test-accuracy drop {about, low, high} in "
        "points; empty unless calibrated"
    )

    @classmethod
    def of(cls, v: VersionInfo) -> ForgettingScale:
        ranker = v.metrics.get("ranker")
        forecasts = v.metrics.get("predicted_forgetting")
        r = omega_reading(
            ranker if isinstance(ranker, str) else None,
            v.method,
            forecasts if isinstance(forecasts, dict) else None,
        )
        return cls(**{k: r.get(k) for k in cls.model_fields if k in r})


class VersionOut(BaseModel):
    id: int
    lineage: str
    number: int
    state: Literal["candidate", "active", "retired", "failed"]
    parent_id: int | None
    task_id: int | None = Field(description="the task this version learned")
    method: str
    lambdas: dict[str, Any] = Field(description="λ per prior task")
    metrics: dict[str, Any] = Field(description="test/dev metrics, predicted forgetting, ...")
    artifact_sha256: str
    artifact_bytes: int
    job_id: int | None
    created_at: datetime
    activated_at: datetime | None
    served_here: bool = Field(description="this replica is answering /v1/link with it now")
    forgetting_scale: ForgettingScale = Field(
        description="how to read metrics.predicted_forgetting: accuracy drop or relative risk"
    )

    @classmethod
    def of(cls, v: VersionInfo, served_ids: set[int]) -> VersionOut:
        return cls(
            id=v.id,
            lineage=v.lineage,
            number=v.number,
            state=v.state.value,
            parent_id=v.parent_id,
            task_id=v.task_id,
            method=v.method,
            lambdas=v.lambdas,
            metrics=v.metrics,
            artifact_sha256=v.artifact.sha256,
            artifact_bytes=v.artifact.bytes,
            job_id=v.job_id,
            created_at=v.created_at,
            activated_at=v.activated_at,
            served_here=v.id in served_ids,
            forgetting_scale=ForgettingScale.of(v),
        )


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(max_length=500), AfterValidator(valid_text)] | None = Field(
        default=None, description="why: recorded in the audit log, shown on the dashboard"
    )
    by: Annotated[str, Field(min_length=1, max_length=80), AfterValidator(valid_text)] | None = (
        Field(default=None, description="who: recorded in the audit log as the actor api:<by>")
    )


class TaskOut(BaseModel):
    id: int
    name: str
    ontology_id: int
    ontology: str | None
    sizes: dict[str, Any] = Field(description="concepts and queries per split (counts only)")
    created_at: datetime

    @classmethod
    def of(cls, t: TaskInfo, ontology_names: dict[int, str]) -> TaskOut:
        return cls(
            id=t.id,
            name=t.name,
            ontology_id=t.ontology_id,
            ontology=ontology_names.get(t.ontology_id),
            sizes=t.sizes,
            created_at=t.created_at,
        )


class OntologyOut(BaseModel):
    id: int
    name: str
    source: str | None
    concept_count: int | None
    candidates_available: bool = Field(
        description="its concepts are stored: /v1/link can generate candidates from it"
    )
    created_at: datetime

    @classmethod
    def of(cls, o: OntologyInfo) -> OntologyOut:
        return cls(
            id=o.id,
            name=o.name,
            source=o.source,
            concept_count=o.concept_count,
            candidates_available=o.artifact is not None,
            created_at=o.created_at,
        )


class JobOut(BaseModel):
    id: int
    lineage: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str | None = Field(description="validate, load, select_lambda, train, curvature, ...")
    progress: dict[str, Any] = Field(description="epoch, step, loss, dev accuracy, message")
    error: str | None
    attempts: int
    cancel_requested: bool
    options: dict[str, Any] = Field(description="task name, method, λ, training settings")
    timings: dict[str, Any] = Field(description="seconds per phase")
    version_id: int | None = Field(description="the version the job produced, if any")
    metrics: dict[str, Any] | None = Field(
        description="that version's metrics (test, dev, predicted forgetting, λ selection)"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, j: JobInfo, version: tuple[int, dict[str, Any]] | None = None) -> JobOut:
        return cls(
            id=j.id,
            lineage=j.lineage,
            kind=j.kind,
            state=j.state.value,
            phase=j.phase,
            progress=j.progress,
            error=j.error,
            attempts=j.attempts,
            cancel_requested=j.cancel_requested,
            options={k: v for k, v in j.payload.items() if k != "staged_id"},
            timings=j.timings,
            version_id=version[0] if version else None,
            metrics=version[1] if version else None,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyCheck(BaseModel):
    ok: bool
    detail: str | None = None
    version: VersionRef | None = None
    load_error: str | None = Field(
        default=None, description="the newest version that failed to load (old one serving)"
    )


class ReadyOut(BaseModel):
    ready: bool = Field(description="this replica can answer /v1/link")
    checks: dict[str, ReadyCheck] = Field(description="what readiness depends on: model:<lineage>")
    registry: ReadyCheck = Field(
        description="the registry database; reported, not required (linking works without it)"
    )
