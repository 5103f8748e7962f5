"""BM25 candidate generation over concept names and synonyms.

Each concept contributes several index entries (its name, its synonyms and any
extra synonyms, deduplicated after normalisation); a mention's score for a
concept is the best score of that concept's entries. Entries are stored grouped
by concept, so collapsing is one ``np.maximum.reduceat`` per mention.

Ranking is deterministic: by score, ties broken by the concept's position in
the ontology. A mention that shares no token with the index scores 0 for every
concept and gets the first k concepts in ontology order.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

import numpy as np

from kronlink.data._text import normalize
from kronlink.data.schema import Candidate, Concept, Query


def _import_bm25s_without_jax() -> ModuleType:
    """bm25s imports JAX when it is installed and runs a dummy top-k on it at
    import. JAX then claims 75% of the GPU's memory (XLA preallocation): on an
    H200 with JAX installed, 105 of 140 GiB went to a BM25 index, and the
    ranker's training beside it ran out of memory. kronlink ranks with bm25s'
    numpy top-k, so JAX is hidden from that import; a process that imported
    JAX itself keeps it."""
    if "jax" in sys.modules or "bm25s" in sys.modules:
        import bm25s

        return bm25s
    sys.modules["jax"] = None  # type: ignore[assignment]  # makes `import jax` fail
    try:
        import bm25s
    finally:
        del sys.modules["jax"]
    return bm25s


bm25s = _import_bm25s_without_jax()
from bm25s.stopwords import STOPWORDS_EN  # noqa: E402

__all__ = ["CandidateIndex", "attach_candidates", "recall_at_k", "tokenize"]

# Single characters are kept (unlike bm25s' default \w\w+): in medical names
# they carry meaning ("type 1 diabetes", "vitamin D", "stage 2").
_TOKEN = re.compile(r"\w+")
_STOPWORDS = frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without English stopwords."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


class CandidateIndex:
    """A BM25 index over the names and synonyms of an ontology's concepts.

    ``extra_synonyms`` maps a concept id to more strings to index for it; task
    builders pass the train mentions here (never dev or test ones), so a test
    mention cannot retrieve its own copy.
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        extra_synonyms: Mapping[str, Sequence[str]] | None = None,
        *,
        k1: float = 1.5,
        b: float = 0.75,
    ) -> None:
        if not concepts:
            raise ValueError("expected at least one concept, got none")
        self.concepts: tuple[Concept, ...] = tuple(concepts)
        self.ids: tuple[str, ...] = tuple(c.id for c in self.concepts)
        self.position: dict[str, int] = {cid: i for i, cid in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError("expected unique concept ids, got duplicates")
        extra = extra_synonyms or {}
        unknown = set(extra) - set(self.position)
        if unknown:
            raise ValueError(f"extra synonyms for unknown concept ids: {sorted(unknown)[:5]}")

        docs: list[list[str]] = []
        starts: list[int] = []
        for c in self.concepts:
            starts.append(len(docs))
            seen: set[str] = set()
            for text in (c.name, *c.synonyms, *extra.get(c.id, ())):
                key = normalize(text)
                if key and key not in seen:
                    seen.add(key)
                    docs.append(tokenize(text))
        self.n_entries = len(docs)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        # An entry made only of stopwords (HPO's root is called "All") is an
        # empty document; bm25s' empty token keeps it indexable.
        self._bm25.index(docs, show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def concept_scores(self, mention: str) -> np.ndarray:
        """The mention's score for every concept, in ontology order."""
        ids = self._bm25.get_tokens_ids(tokenize(mention))
        if not ids:
            return np.zeros(len(self.ids), dtype=np.float32)
        entry_scores = self._bm25.get_scores_from_ids(ids)
        if self.n_entries == len(self.ids):
            return entry_scores  # one entry per concept: nothing to collapse
        return np.maximum.reduceat(entry_scores, self._starts)

    def search(self, mentions: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Top ``min(k, len(self))`` (concept id, score) per mention, best first."""
        if k < 1:
            raise ValueError(f"expected k >= 1, got {k}")
        k = min(k, len(self.ids))
        return [
            [(self.ids[i], float(s[i])) for i in _top_k(s, k)]
            for s in map(self.concept_scores, mentions)
        ]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by lower index.

    Only the positive scores are partitioned: most concepts share no token
    with a mention and score exactly 0, and np.partition slows down badly on
    many equal values. np.argpartition would also pick arbitrarily among ties
    at the cut-off; here the cut-off value's ties are filled in index order,
    so the result depends only on the scores.
    """
    positive = np.flatnonzero(scores > 0)
    if len(positive) < k:
        zeros = np.flatnonzero(scores <= 0)[: k - len(positive)]
        chosen = np.concatenate([positive, zeros])
    else:
        sub = scores[positive]
        kth = np.partition(sub, len(sub) - k)[len(sub) - k]
        above = positive[sub > kth]
        ties = positive[sub == kth][: k - len(above)]
        chosen = np.concatenate([above, ties])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


def _rng_for(seed: int, query_index: int, mention: str) -> random.Random:
    # A per-query generator: a query's shuffle does not depend on which other
    # queries are in the batch, and hashlib (unlike hash()) is stable across runs.
    digest = hashlib.sha256(f"{seed}\x1f{query_index}\x1f{mention}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def attach_candidates(
    queries: Sequence[Query],
    index: CandidateIndex,
    concepts_by_id: Mapping[str, Concept],
    k: int,
    insert_gold: bool,
    seed: int = 0,
) -> list[Query]:
    """Return copies of ``queries`` with BM25 candidates, shuffled.

    With ``insert_gold`` (training) a query whose gold the top k missed gets
    the gold plus the top k-1 retrieved concepts (the paper's protocol); without
    it (dev, test, inference) the top k are kept as retrieved and the gold may
    be absent. Candidates are shuffled with a generator seeded from ``seed``,
    the query's position and its mention, so the gold's position carries no
    signal and the same inputs give the same order.
    """
    hits = index.search([q.mention for q in queries], k)
    out: list[Query] = []
    for qi, (query, ranked) in enumerate(zip(queries, hits, strict=True)):
        ids = [cid for cid, _ in ranked]
        if insert_gold and query.gold is not None and query.gold not in ids:
            if query.gold not in concepts_by_id:
                raise KeyError(f"gold {query.gold!r} of query {qi} is not in the ontology")
            ids = [*ids[: len(ids) - 1], query.gold] if len(ids) >= k else [*ids, query.gold]
        _rng_for(seed, qi, query.mention).shuffle(ids)
        candidates = tuple(Candidate(id=cid, name=concepts_by_id[cid].name) for cid in ids)
        out.append(
            Query(
                mention=query.mention,
                gold=query.gold,
                left_context=query.left_context,
                right_context=query.right_context,
                candidates=candidates,
                split=query.split,
            )
        )
    return out


def recall_at_k(queries: Sequence[Query], index: CandidateIndex, k: int) -> float:
    """Share of queries whose gold is among the top k retrieved (no insertion)."""
    if not queries:
        return 0.0
    hits = index.search([q.mention for q in queries], k)
    found = sum(
        1 for q, ranked in zip(queries, hits, strict=True) if any(c == q.gold for c, _ in ranked)
    )
    return found / len(queries)
