"""One retriever for serving, training candidates and evaluation.

    r = Retriever(concepts, mode="fused", dense=DenseIndex.load(...), encoder=Encoder())
    r.search(["high blood pressure"], k=10)   # [[(id, score), ...]]

Order of a result list:

1. exact and normalised-name matches (the mention equals a concept's name or
   stored synonym after :func:`normalize`, or the name without ICD-10-CM's
   trailing ", unspecified": :func:`name_keys`), always included, in ontology
   order; a clinician typing "Asthma" must get Asthma among the candidates.
   Failing those, and only when ``variants`` is on (the default), an
   acronym the ontology spells out ("COPD": :func:`acronym_expansions`) whose
   long form is a name, or else the one concept sharing the mention's
   :func:`loose_keys` ("kidney stones" = "Stone in kidney"); see :meth:`match`;
2. then, in ``mode="bm25"``, BM25's ranking (the project's CandidateIndex);
   in ``mode="fused"``, weighted reciprocal-rank fusion of BM25's and the
   dense index's top ``depth``:
   ``score(c) = w_dense / (rrf_k + rank_dense(c)) + w_bm25 / (rrf_k + rank_bm25(c))``
   with ranks from 1 and a list that misses ``c`` contributing 0 (BM25
   hits of score 0, its filler for mentions sharing no token, count as missing). Plain RRF
   (k = 60, equal weights) was measured below dense alone on names-only
   indexes (issue 12), hence the weights are settings. The defaults (w_bm25
   0.25, rrf_k 1) were chosen on dev (bench/fusion_grid.py): with
   ``w_bm25 < w_dense / (rrf_k + 2)`` the first place is always dense's
   first (no BM25 rank can lift dense's second above it): on dev, every
   setting that lets BM25 move the first place lost recall@1, while BM25
   still lifts what dense ranks low into the top 10 and 25.

Scores returned are the fused score (fused mode) or BM25's (bm25 mode);
exact matches get ``inf`` so a caller sorting by score keeps them first.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np

from kronlink.data._text import acronym_expansions, loose_key, loose_keys, name_keys, normalize
from kronlink.data.candidates import CandidateIndex
from kronlink.data.schema import Concept
from kronlink.retrieval.dense import DenseIndex, Encoder

__all__ = ["MatchKind", "Mode", "Retriever"]

Mode = Literal["bm25", "fused"]
MatchKind = Literal["exact", "acronym", "loose", ""]


class Retriever:
    """BM25 (always) plus, in fused mode, a dense index; exact names first."""

    def __init__(
        self,
        concepts: Sequence[Concept],
        *,
        mode: Mode = "bm25",
        dense: DenseIndex | None = None,
        encoder: Encoder | None = None,
        w_dense: float = 1.0,
        w_bm25: float = 0.25,
        rrf_k: float = 1.0,
        depth: int = 100,
        bm25: CandidateIndex | None = None,
        variants: bool = True,
    ) -> None:
        if mode not in ("bm25", "fused"):
            raise ValueError(f"expected mode 'bm25' or 'fused', got {mode!r}")
        if mode == "fused" and (dense is None or encoder is None):
            raise ValueError("mode 'fused' needs a dense index and its encoder")
        self.concepts = tuple(concepts)
        self.bm25 = bm25 if bm25 is not None else CandidateIndex(self.concepts)
        self.ids = self.bm25.ids
        if dense is not None and tuple(dense.ids) != self.ids:
            raise ValueError("the dense index was built over other concepts (ids differ)")
        if dense is not None and encoder is not None and dense.encoder != encoder.version:
            raise ValueError(
                f"the dense index was made by {dense.encoder}, the encoder is {encoder.version}"
            )
        self.mode: Mode = mode
        self.dense, self.encoder = dense, encoder
        self.w_dense, self.w_bm25, self.rrf_k, self.depth = w_dense, w_bm25, rrf_k, depth
        exact: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(self.concepts):
            for key in set().union(*(name_keys(t) for t in (c.name, *c.synonyms))):
                exact[key].append(i)
        self._exact = {k: sorted(v) for k, v in exact.items()}
        self.variants = variants
        self._acronyms, self._loose, self._words = _variant_tables(self.concepts, self._exact)

    def with_encoder(self, encoder: Encoder) -> Retriever:
        """The same indexes and fusion, mentions encoded by ``encoder`` (a
        version's tuned query tower, whose ``version`` is the index's); bm25
        mode has no encoder to change."""
        if self.mode != "fused":
            return self
        if self.dense is not None and self.dense.encoder != encoder.version:
            raise ValueError(
                f"the dense index was made by {self.dense.encoder}, the encoder is {encoder.version}"
            )
        # a shallow copy shares the BM25 index and the exact, acronym and
        # loose tables, which do not depend on the encoder (1 s on ICD-10-CM)
        out = copy.copy(self)
        out.encoder = encoder
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def exact(self, mention: str) -> list[int]:
        """Positions of the concepts the mention names: :meth:`match`'s."""
        return self.match(mention)[1]

    def match(self, mention: str) -> tuple[MatchKind, list[int]]:
        """How the mention names concepts, and their positions (ontology order).

        - ``"exact"``: it equals a name or stored synonym (:func:`name_keys`);
        - ``"acronym"``: it is an acronym the ontology spells out whose long
          form is an exact key ("COPD" -> "Chronic obstructive pulmonary
          disease, unspecified"); typed in lower case only when the acronym is
          no word of the ontology's own ("copd", never "iris" or "all");
        - ``"loose"``: the one concept sharing its :func:`loose_keys`
          ("kidney stones" -> "Stone in kidney"); a loose key shared by two
          concepts ("left to right shunt", "right to left shunt") matches none;
        - ``""``: none of these.

        Measured on held-out mentions by bench/mention_variants.py."""
        key = normalize(mention)
        hit = self._exact.get(key)
        if hit or not self.variants:
            return ("exact", hit) if hit else ("", [])
        hit = self._acronyms.get(key)
        if hit and (mention.strip().isupper() or key not in self._words):
            return "acronym", hit
        hit = self._loose.get(loose_key(mention))
        return ("loose", hit) if hit else ("", [])

    def search(
        self, mentions: Sequence[str], k: int, *, query_vectors: np.ndarray | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top ``min(k, len(self))`` (concept id, score) per mention, best first.

        ``query_vectors``: the mentions' dense vectors when already encoded."""
        if k < 1:
            raise ValueError(f"expected k >= 1, got {k}")
        k = min(k, len(self.ids))
        depth = max(k, self.depth) if self.mode == "fused" else k
        bm25_hits = self.bm25.search(mentions, depth)
        if self.mode == "fused":
            assert self.dense is not None and self.encoder is not None
            q = self.encoder.encode(list(mentions)) if query_vectors is None else query_vectors
            dense_scores = self.dense.concept_scores(q)
        out: list[list[tuple[str, float]]] = []
        for qi, mention in enumerate(mentions):
            first = [self.ids[i] for i in self.exact(mention)][:k]
            taken = set(first)
            if self.mode == "bm25":
                rest = [(cid, s) for cid, s in bm25_hits[qi] if cid not in taken]
            else:
                rest = self._fuse(bm25_hits[qi], dense_scores[qi], depth, taken)
            out.append([(cid, float("inf")) for cid in first] + rest[: k - len(first)])
        return out

    def _fuse(
        self,
        bm25_ranked: list[tuple[str, float]],
        dense_row: np.ndarray,
        depth: int,
        taken: set[str],
    ) -> list[tuple[str, float]]:
        fused: dict[str, float] = defaultdict(float)
        for r, (cid, score) in enumerate(bm25_ranked, 1):
            if score <= 0:  # BM25's filler (no shared token) is no evidence
                break
            fused[cid] += self.w_bm25 / (self.rrf_k + r)
        depth = min(depth, len(dense_row))
        top = np.argpartition(-dense_row, depth - 1)[:depth]
        top = top[np.lexsort((top, -dense_row[top]))]  # ties by ontology order
        for r, i in enumerate(top, 1):
            fused[self.ids[i]] += self.w_dense / (self.rrf_k + r)
        pos = self.bm25.position
        ranked = sorted(
            ((cid, s) for cid, s in fused.items() if cid not in taken),
            key=lambda t: (-t[1], pos[t[0]]),
        )
        return ranked


def _variant_tables(
    concepts: Sequence[Concept], exact: dict[str, list[int]]
) -> tuple[dict[str, list[int]], dict[str, list[int]], frozenset[str]]:
    """Acronym -> positions, loose key -> position, and the lower-case words
    the ontology writes (an acronym spelled like one must be typed in capitals).

    An acronym is kept only when all its long forms that are exact keys name
    the same concepts: "GI" spelled out as three different findings is left
    to the ranker."""
    texts = [(c.name, *c.synonyms) for c in concepts]
    acronyms: dict[str, list[int]] = {}
    for acronym, forms in acronym_expansions(texts).items():
        if acronym in exact:
            continue
        targets = {tuple(exact[f]) for f in forms if f in exact}
        if len(targets) == 1:
            acronyms[acronym] = list(targets.pop())
    loose: dict[str, set[int]] = defaultdict(set)
    words: set[str] = set()
    for i, ts in enumerate(texts):
        for t in ts:
            words.update(w for w in re.findall(r"[^\W\d_]+", t) if w.islower())
            for key in loose_keys(t):
                loose[key].add(i)
    unique = {k: [next(iter(v))] for k, v in loose.items() if len(v) == 1}
    return acronyms, unique, frozenset(words)
