"""Candidate generation from registered ontologies, for requests without candidates.

An ontology's concepts file is an artifact (stored by the job that first
registered it; a folder that also holds the dense index when the worker ran
in fused mode); its retriever (kronlink.retrieval, the same one training
and evaluation use) is built on first use, off the event loop, and kept for
the next requests (the ``ontologies_cached`` most recently used). Ontologies
are immutable once registered, so a cached index never goes stale.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kronlink.data.io import ONTOLOGY_FILE, read_ontology
from kronlink.data.schema import Candidate, Concept
from kronlink.registry import ArtifactStore, NotFoundError, OntologyInfo, get_ontology
from kronlink.registry.models import Ontology
from kronlink.retrieval import Retriever, retriever_for
from kronlink.retrieval.tower import QueryEncoder
from service.problems import FieldError, ProblemError

__all__ = ["OntologyIndex", "OntologyIndexes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OntologyIndex:
    info: OntologyInfo
    index: Retriever
    concepts: dict[str, Concept]

    def exact_ids(self, mention: str) -> frozenset[str]:
        """Ids of the concepts whose name or stored synonym equals the mention."""
        return frozenset(self.index.ids[i] for i in self.index.exact(mention))

    def retrieve(
        self, mentions: Sequence[str], k: int, *, encoder: QueryEncoder | None = None
    ) -> list[tuple[tuple[Candidate, ...], tuple[bool, ...]]]:
        """The top ``k`` concepts per mention, best first (model thread only),
        and per concept whether the retriever has evidence for it.

        ``encoder``: the served version's tuned query tower; in fused mode it
        encodes the mentions instead of the shipped encoder (the index's
        concept side is the same, so the stored index serves every version).

        A concept BM25 scores 0 shares no word with the mention: BM25 fills
        its top k with the ontology's first concepts then. Such filler is
        still scored, so the softmax and the calibration see k candidates as
        on dev, but it is never served as an answer (the ranker, made to pick
        one, served "flu" -> "A00 Cholera"). An exact match scores inf and a
        fused hit > 0: both are evidence."""
        vectors = None
        dense = self.index.dense
        if encoder is not None and self.index.mode == "fused" and dense is not None:
            if encoder.version == dense.encoder:
                vectors = encoder.encode(list(mentions))
            else:  # cannot happen with the shipped encoder; never search mismatched vectors
                log.warning(
                    "ontology %s: the version's tower is for %s, the index is %s; "
                    "using the index's own encoder",
                    self.info.name,
                    encoder.version,
                    dense.encoder,
                )
        return [
            (
                tuple(Candidate(cid, self.concepts[cid].name) for cid, _ in hits),
                tuple(score > 0 for _, score in hits),
            )
            for hits in self.index.search(list(mentions), k, query_vectors=vectors)
        ]

    def candidates(self, mentions: Sequence[str], k: int) -> list[tuple[Candidate, ...]]:
        """The top ``k`` concepts per mention, best first, filler included."""
        return [c for c, _ in self.retrieve(mentions, k)]


class OntologyIndexes:
    def __init__(
        self,
        factory: sessionmaker[Session],
        store: ArtifactStore,
        *,
        capacity: int,
        settings: object = None,
    ) -> None:
        self._settings = settings  # retriever mode and fusion (kronlink.settings)
        self._factory = factory
        self._store = store
        self._capacity = capacity
        self._cache: OrderedDict[str, OntologyIndex] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def cached(self, name: str) -> OntologyIndex | None:
        """The index when it is built already (no I/O, no wait), else None."""
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
        return hit

    async def get(self, name: str, loc: str = "body.ontology") -> OntologyIndex:
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one build per ontology, however many requests wait
            hit = self._cache.get(name)
            if hit is None:
                hit = await asyncio.to_thread(self._build, name, loc)
                self._cache[name] = hit
                while len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            self._locks.pop(name, None)
        return hit

    def _build(self, name: str, loc: str) -> OntologyIndex:
        with self._factory.begin() as s:
            try:
                info = get_ontology(s, name)
            except NotFoundError:
                names = s.scalars(select(Ontology.name).order_by(Ontology.id)).all()
                raise ProblemError(
                    422,
                    "validation-error",
                    f"ontology {name!r} is not registered; registered: "
                    f"{', '.join(names) or 'none'} (GET /v1/ontologies)",
                    errors=[FieldError(loc=loc, message="unknown ontology")],
                ) from None
        if info.artifact is None:
            raise ProblemError(
                422,
                "validation-error",
                f"ontology {name!r} has no stored concepts file (registered before "
                "they were kept), so candidates cannot be generated: send candidates",
                errors=[FieldError(loc=loc, message="no concepts stored")],
            )
        scratch = Path(tempfile.mkdtemp(prefix="kronlink-onto-"))
        try:
            art = info.artifact
            path = self._store.get(self._store.key_of(art.uri), art.sha256, scratch / "o")
            folder = path if path.is_dir() else None
            concepts = read_ontology(path / ONTOLOGY_FILE if folder else path)
            retriever = retriever_for(concepts, self._settings, folder=folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("ontology %s: %s retriever over %d concepts", name, retriever.mode, len(concepts))
        return OntologyIndex(info, retriever, {c.id: c for c in concepts})
