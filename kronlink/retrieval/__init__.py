"""Candidate retrieval shared by serving, training and evaluation.

from kronlink.retrieval import retriever_for
r = retriever_for(concepts, settings, folder=None)   # mode from settings
r.search(mentions, k)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kronlink.data.schema import Concept, Query, Task
from kronlink.retrieval.dense import META_FILE, DenseIndex, Encoder, encoder_version
from kronlink.retrieval.retriever import Mode, Retriever

__all__ = [
    "DenseIndex",
    "Encoder",
    "Mode",
    "Retriever",
    "encoder_version",
    "retriever_for",
    "task_retriever",
    "top1",
]

log = logging.getLogger(__name__)

_ENCODER: Encoder | None = None


def shared_encoder() -> Encoder:
    """One encoder per process (loading MiniLM takes ~1 s and 90 MB)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = Encoder()
    return _ENCODER


def retriever_for(
    concepts: Sequence[Concept],
    settings: object,
    *,
    folder: str | Path | None = None,
    mode: Mode | None = None,
) -> Retriever:
    """The retriever the settings ask for over ``concepts``.

    In fused mode the dense index is read from ``folder`` (the ontology's
    artifact folder) when it holds one made by the serving encoder, else built
    here (minutes at ICD-10-CM size on 2 CPU cores) and logged.
    """
    mode = mode or getattr(settings, "retriever_mode", "bm25")
    variants = getattr(settings, "retriever_variants", True)
    if mode == "bm25":
        return Retriever(concepts, mode="bm25", variants=variants)
    encoder = shared_encoder()
    dense = None
    if folder is not None and (Path(folder) / META_FILE).is_file():
        found = DenseIndex.load(folder)
        if found.encoder == encoder.version and tuple(found.ids) == tuple(c.id for c in concepts):
            dense = found
        else:
            log.warning("dense index in %s is stale (%s); rebuilding", folder, found.encoder)
    if dense is None:
        log.info("building the dense index over %d concepts", len(concepts))
        dense = DenseIndex.build(concepts, encoder)
    return Retriever(
        concepts,
        mode="fused",
        dense=dense,
        encoder=encoder,
        variants=variants,
        **fusion_settings(settings),
    )


def fusion_settings(settings: object) -> dict[str, float]:
    """The fusion's keyword arguments for :class:`Retriever` (``w_dense``,
    ``w_bm25``, ``rrf_k``, ``depth``) from ``settings``; the benches record
    them as they are served."""
    return {
        "w_dense": getattr(settings, "fusion_w_dense", 1.0),
        "w_bm25": getattr(settings, "fusion_w_bm25", 0.25),
        "rrf_k": getattr(settings, "fusion_rrf_k", 1.0),
        "depth": getattr(settings, "fusion_depth", 100),
    }


def task_retriever(task: Task, settings: object) -> Retriever:
    """The retriever over ``task``'s ontology as it will be stored (without
    any string the task uses as a query), as serving will build it. The
    worker's job and ``kronlink update`` both fit the retrieval prior and the
    gate's floor with it, so they agree with what is served."""
    from kronlink.data.splits import without_query_strings

    concepts = without_query_strings(task.concepts, task.queries)
    return retriever_for(concepts, settings)


def top1(retriever: Retriever, queries: Sequence[Query]) -> float | None:
    """Share of ``queries`` whose gold is the retriever's first answer (None: no queries)."""
    if not queries:
        return None
    hits = retriever.search([q.mention for q in queries], 1)
    return sum(h[0][0] == q.gold for h, q in zip(hits, queries, strict=True)) / len(queries)
