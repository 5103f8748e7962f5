"""The served model of one lineage, and how it is swapped without failing a request.

A :class:`ModelHolder` keeps one reference, ``current``: a loaded, warmed
:class:`LoadedModel` and the version it is. When the registry's active
version changes (the watcher polls it, and a notification or an activation
through this replica nudges it), the holder fetches the new version's folder
from the artifact store (checksum verified, as the worker does), loads it
beside the old one, warms it with a forward pass, and then replaces the
reference in one assignment on the event loop. A batch takes the reference
once when it starts, so requests already running finish on the old model;
it is freed when the last of them ends.

A version that fails to load (checksum mismatch, corrupt file) is reported
(log, ``kronlink_model_load_failures_total``, ``/readyz`` detail) and the
old model keeps serving; the same version is tried again after
``model_retry_s`` (a transient read error can heal; a corrupt artifact
stays corrupt and keeps being reported).

The previously served model stays loaded too, so a rollback to it swaps at
once; any older one is dropped (memory stays bounded at two models).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from kronlink.calibration import Calibrator
from kronlink.data.schema import Candidate, Query
from kronlink.models import Ranker, load_ranker, masked_log_softmax
from kronlink.ranking import rank_scores
from kronlink.registry import ArtifactStore, VersionInfo, active_version
from kronlink.retrieval.tower import TOWER_DIR, QueryEncoder, QueryTower
from kronlink.retrieval_prior import RetrievalPrior
from service.metrics import Metrics

__all__ = [
    "LoadFailure",
    "LoadedModel",
    "ModelHolder",
    "by_ontology_of",
    "calibrator_of",
    "load_version",
    "retrieval_prior_of",
]

log = logging.getLogger(__name__)

_WARM_QUERIES = (
    Query(
        mention="chest pain",
        gold=None,
        left_context="patient reports",
        right_context="since monday",
        candidates=(Candidate("a", "angina pectoris"), Candidate("b", "pain in chest")),
    ),
)


@dataclass(frozen=True)
class LoadedModel:
    """A ranker ready to answer, and the version it is."""

    version: VersionInfo
    ranker: Ranker
    # P(top-1 right), from the version's metrics["calibration"]; None: an older
    # version without one (it answers with no calibrated probability)
    calibrator: Calibrator | None = None
    # beta * -log(1 + retriever rank), from the version's metrics["retrieval_prior"]
    # (kronlink.retrieval_prior); None: a version fitted without one
    retrieval_prior: RetrievalPrior | None = None
    # the version's tuned query tower as a retriever encoder (its folder's
    # ``tower/``, kronlink.retrieval.learn); None: the shipped encoder serves
    query_encoder: QueryEncoder | None = None
    # per ontology, the calibration and retrieval prior fitted on that
    # ontology's task (metrics["by_ontology"]): an earlier task's are carried
    # from the version that learned it. An ontology not in it (a version from
    # before these records) gets the version's own, as before.
    by_ontology: Mapping[str, tuple[Calibrator | None, RetrievalPrior | None]] = field(
        default_factory=dict
    )

    def calibrator_for(self, ontology: str | None) -> Calibrator | None:
        """The calibration answers on ``ontology`` get (None: a caller's own
        candidates, or an ontology without its own: the version's)."""
        if ontology is not None and ontology in self.by_ontology:
            return self.by_ontology[ontology][0]
        return self.calibrator

    def retrieval_prior_for(self, ontology: str | None) -> RetrievalPrior | None:
        """The retrieval prior candidates generated from ``ontology`` get."""
        if ontology is not None and ontology in self.by_ontology:
            return self.by_ontology[ontology][1]
        return self.retrieval_prior

    def score(
        self,
        queries: Sequence[Query],
        *,
        exact_margin: float = 0.0,
        exact_ids: Sequence[Collection[str] | None] | None = None,
        retrieval_ranks: Sequence[Sequence[int] | None] | None = None,
        ontology: str | None = None,
    ) -> list[tuple[list[float], list[float]]]:
        """Per query, (scores, probabilities) of its candidates in input order.

        Called from the model thread only; one forward pass for all queries.
        ``exact_margin`` and ``exact_ids``: the exact-name prior
        (kronlink.ranking, the same function evaluation ranks with), its
        margin in calibrated nats: times the ontology's calibration's
        ``score_scale`` on the raw scores (1 without a calibration).
        ``retrieval_ranks``: per query its candidates' positions in the
        retriever's order (None for a caller's own candidates); the version's
        retrieval prior is applied to them.
        """
        # The exact-name margin is in calibrated nats: a model whose raw scores
        # dev found t times overconfident needs a t times larger raw margin.
        cal = self.calibrator_for(ontology)
        raw_margin = exact_margin * (cal.score_scale() if cal is not None else 1.0)
        with torch.inference_mode():
            scores, batch = rank_scores(
                self.ranker,
                queries,
                exact_margin=raw_margin,
                exact_ids=exact_ids,
                retrieval_prior=self.retrieval_prior_for(ontology),
                retrieval_ranks=retrieval_ranks,
            )
            probs = masked_log_softmax(scores, batch.candidate_mask).exp()
            s_rows, p_rows = scores.cpu().tolist(), probs.cpu().tolist()
        out = []
        for q, s, p in zip(queries, s_rows, p_rows, strict=True):
            n = len(q.candidates or ())
            out.append((s[:n], p[:n]))
        return out


@dataclass(frozen=True)
class LoadFailure:
    version_id: int
    number: int
    error: str
    at: datetime
    monotonic: float


def calibrator_of(version: VersionInfo) -> Calibrator | None:
    """The version's own calibration, or None when it has none or it is
    unreadable (logged: the model still serves, without a calibrated probability)."""
    record = (version.metrics or {}).get("calibration")
    if record is None:
        return None
    try:
        return Calibrator.from_dict(record)
    except (ValueError, TypeError) as exc:
        log.warning(
            "version %s (id %s): unreadable calibration, serving without one: %s",
            version.number,
            version.id,
            exc,
        )
        return None


def retrieval_prior_of(version: VersionInfo) -> RetrievalPrior | None:
    """The version's retrieval prior, or None when it has none or it is
    unreadable (logged: the model still serves, without it)."""
    record = (version.metrics or {}).get("retrieval_prior")
    if record is None:
        return None
    try:
        return RetrievalPrior.from_dict(record)
    except (ValueError, TypeError) as exc:
        log.warning(
            "version %s (id %s): unreadable retrieval prior, serving without one: %s",
            version.number,
            version.id,
            exc,
        )
        return None


def by_ontology_of(
    version: VersionInfo,
) -> dict[str, tuple[Calibrator | None, RetrievalPrior | None]]:
    """Per ontology the calibration and retrieval prior its answers get
    (metrics["by_ontology"], written by the worker's job); an unreadable
    entry serves without either (logged), as the version's own would."""
    out: dict[str, tuple[Calibrator | None, RetrievalPrior | None]] = {}
    records = (version.metrics or {}).get("by_ontology")
    if not isinstance(records, dict):
        return out
    for name, rec in records.items():
        try:
            cal = rec.get("calibration")
            prior = rec.get("retrieval_prior")
            out[name] = (
                Calibrator.from_dict(cal) if cal is not None else None,
                RetrievalPrior.from_dict(prior) if prior is not None else None,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning(
                "version %s (id %s): unreadable calibration or prior of %s, serving it without: %s",
                version.number,
                version.id,
                name,
                exc,
            )
            out[name] = (None, None)
    return out


def load_version(store: ArtifactStore, version: VersionInfo, device: str) -> LoadedModel:
    """Fetch a version's model folder (checksum verified), load it and warm it up."""
    art = version.artifact
    scratch = Path(tempfile.mkdtemp(prefix="kronlink-serve-"))
    try:
        # a local store verifies in place and ignores dest; a remote one downloads there
        path = store.get(store.key_of(art.uri), art.sha256, scratch / "model")
        ranker = load_ranker(path, map_location=device)
        tower = None
        if (path / TOWER_DIR).is_dir():
            tower = QueryTower.load(path / TOWER_DIR).to(device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the weights are in memory now
    ranker.eval()
    model = LoadedModel(
        version=version,
        ranker=ranker,
        calibrator=calibrator_of(version),
        retrieval_prior=retrieval_prior_of(version),
        by_ontology=by_ontology_of(version),
        query_encoder=tower.query_encoder(batch_size=64) if tower is not None else None,
    )
    # first-call costs (allocator, lazy init) are paid here, not by a request
    model.score(_WARM_QUERIES)
    if model.query_encoder is not None:
        model.query_encoder.encode([q.mention for q in _WARM_QUERIES])
    return model


class ModelHolder:
    """The model one lineage is served with; see the module docstring."""

    def __init__(
        self,
        lineage: str,
        *,
        factory: sessionmaker[Session],
        store: ArtifactStore,
        device: str,
        metrics: Metrics,
        retry_s: float,
    ) -> None:
        self.lineage = lineage
        self._factory = factory
        self._store = store
        self._device = device
        self._metrics = metrics
        self._retry_s = retry_s
        self.current: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self.failure: LoadFailure | None = None
        self.active_id: int | None = None  # what the registry said last
        self.checked_at: datetime | None = None
        self._lock = asyncio.Lock()
        metrics.active_version.labels(lineage).set(0)
        metrics.active_version_id.labels(lineage).set(0)

    def _active(self) -> VersionInfo | None:
        with self._factory.begin() as s:
            return active_version(s, self.lineage)

    async def refresh(self) -> None:
        """Look up the active version; load and swap to it when it changed.

        Raises what the database raises (the watcher logs it); a load failure
        is recorded, not raised.
        """
        async with self._lock:
            active = await asyncio.to_thread(self._active)
            self.checked_at = datetime.now(UTC)
            self.active_id = active.id if active is not None else None
            current = self.current
            if active is None or (current is not None and current.version.id == active.id):
                if self.failure is not None and (
                    active is None or self.failure.version_id != active.id
                ):
                    self.failure = None  # that version is no longer wanted (rolled back)
                return
            f = self.failure
            if (
                f is not None
                and f.version_id == active.id
                and time.monotonic() - f.monotonic < self._retry_s
            ):
                return  # reported already; retried after model_retry_s
            prev = self._previous
            if prev is not None and prev.version.id == active.id:
                self._swap(prev, "kept in memory")
                return
            t0 = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(load_version, self._store, active, self._device)
            except Exception as exc:
                self._failed(active, exc)
                return
            self._metrics.load_seconds.labels(self.lineage).observe(time.perf_counter() - t0)
            self._swap(loaded, f"loaded in {time.perf_counter() - t0:.2f} s")

    def _swap(self, new: LoadedModel, how: str) -> None:
        old = self.current
        self.current = new  # the swap: one reference, replaced on the event loop
        self._previous = old
        self.failure = None
        v = new.version
        self._metrics.swaps.labels(self.lineage).inc()
        self._metrics.active_version.labels(self.lineage).set(v.number)
        self._metrics.active_version_id.labels(self.lineage).set(v.id)
        log.info(
            "lineage %s now serves version %s (id %s, %s)%s",
            self.lineage,
            v.number,
            v.id,
            how,
            f"; was version {old.version.number}" if old else "",
            extra={"lineage": self.lineage, "version_id": v.id, "version": v.number},
        )
        if old is not None and old.ranker.device.type == "cuda":
            torch.cuda.empty_cache()  # the one before ``old`` is unreferenced now

    def _failed(self, version: VersionInfo, exc: Exception) -> None:
        self.failure = LoadFailure(
            version_id=version.id,
            number=version.number,
            error=f"{type(exc).__name__}: {exc}",
            at=datetime.now(UTC),
            monotonic=time.monotonic(),
        )
        self._metrics.load_failures.labels(self.lineage).inc()
        served = self.current.version.number if self.current else None
        log.error(
            "lineage %s: version %s (id %s) failed to load; still serving %s: %s",
            self.lineage,
            version.number,
            version.id,
            f"version {served}" if served else "nothing",
            self.failure.error,
            extra={"lineage": self.lineage, "version_id": version.id},
        )
