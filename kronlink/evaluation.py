"""Ranking metrics: accuracy@1 (the paper's accuracy), MRR and recall@k.

A query whose gold concept is not among its candidates counts as a miss at
every cutoff: at inference nothing inserts the gold (DESIGN.md section 2), so
candidate generation's misses are the ranker's misses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kronlink.data.schema import Query
from kronlink.models.base import Ranker, RankerBatch, masked_log_softmax
from kronlink.models.dataset import encoded_queries
from kronlink.ranking import rank_scores
from kronlink.retrieval_prior import RetrievalPrior

__all__ = [
    "Metrics",
    "evaluate",
    "metrics_from_ranks",
    "metrics_from_scored",
    "rank_of_gold",
    "score_queries",
    "top1_right",
]


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    mrr: float
    recall: dict[int, float] = field(default_factory=dict)
    n: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["recall"] = {str(k): v for k, v in self.recall.items()}
        return d


def metrics_from_ranks(ranks: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> Metrics:
    """``ranks``: 1-based rank of the gold per query, 0 where it is absent."""
    n = len(ranks)
    if n == 0:
        return Metrics(accuracy=0.0, mrr=0.0, recall={k: 0.0 for k in ks}, n=0)
    acc = sum(1 for r in ranks if r == 1) / n
    mrr = sum(1.0 / r for r in ranks if r > 0) / n
    recall = {k: sum(1 for r in ranks if 0 < r <= k) / n for k in ks}
    return Metrics(accuracy=acc, mrr=mrr, recall=recall, n=n)


def rank_of_gold(
    scores: torch.Tensor, candidate_mask: torch.Tensor, labels: torch.Tensor
) -> list[int]:
    """1-based rank of each row's gold candidate; ties count against the gold
    (a constant scorer must not look perfect); 0 where labels is -1."""
    filled = scores.masked_fill(~candidate_mask, float("-inf"))
    gold = filled.gather(1, labels.clamp_min(0).unsqueeze(1))
    better_or_equal = ((filled >= gold) & candidate_mask).sum(1)
    ranks = better_or_equal.where(labels >= 0, torch.zeros_like(better_or_equal))
    return [int(r) for r in ranks.tolist()]


def metrics_from_scored(
    queries: Sequence[Query],
    scored: Sequence[Sequence[tuple[str, float, float]]],
    ks: Sequence[int] = (1, 5, 10),
) -> Metrics:
    """:func:`evaluate`'s metrics from :func:`score_queries`' output for the
    same queries, with :func:`rank_of_gold`'s rule (ties count against the
    gold): a caller that already scored a split need not score it again."""
    ranks = []
    for q, cands in zip(queries, scored, strict=True):
        g = q.gold_index()
        ranks.append(0 if g < 0 else sum(s >= cands[g][1] for _, s, _ in cands))
    return metrics_from_ranks(ranks, ks)


def top1_right(
    queries: Sequence[Query], scored: Sequence[Sequence[tuple[str, float, float]]]
) -> list[bool]:
    """Per query, whether its best-scored candidate (the first on a tie, as
    serving answers) is the gold: what calibration predicts. A query with no
    candidates, or whose gold is not among them, is wrong."""
    return [
        bool(cands) and max(cands, key=lambda c: c[1])[0] == q.gold
        for q, cands in zip(queries, scored, strict=True)
    ]


def _batches(
    model: Ranker, queries: Sequence[Query], batch_size: int
) -> Iterator[tuple[int, RankerBatch]]:
    """(start, batch on the model's device), from the tokenised-query cache
    when the ranker supports it (dev sets are scored every epoch)."""
    data = encoded_queries(model, queries) if queries else None
    for start in range(0, len(queries), batch_size):
        if data is not None:
            batch = data.batch(range(start, min(start + batch_size, len(queries))))
        else:
            batch = model.encode(queries[start : start + batch_size])
        yield start, batch.to(model.device)


def _scored(
    model: Ranker,
    queries: Sequence[Query],
    batch_size: int,
    exact_margin: float,
    retrieval_prior: RetrievalPrior | None,
    retrieval_ranks: Sequence[Sequence[int] | None] | None,
) -> Iterator[tuple[int, Sequence[Query], torch.Tensor, RankerBatch]]:
    """(start, chunk, scores as served, batch) per batch: both scorers below
    order answers exactly as :func:`kronlink.ranking.rank_scores` does."""
    for start, batch in _batches(model, queries, batch_size):
        chunk = queries[start : start + batch_size]
        scores, batch = rank_scores(
            model,
            chunk,
            exact_margin=exact_margin,
            batch=batch,
            retrieval_prior=retrieval_prior,
            retrieval_ranks=None
            if retrieval_ranks is None
            else retrieval_ranks[start : start + len(chunk)],
        )
        yield start, chunk, scores, batch


@torch.no_grad()
def score_queries(
    model: Ranker,
    queries: Sequence[Query],
    *,
    batch_size: int = 64,
    exact_margin: float = 0.0,
    on_batch: Callable[[int, int], None] | None = None,
    retrieval_prior: RetrievalPrior | None = None,
    retrieval_ranks: Sequence[Sequence[int] | None] | None = None,
) -> list[list[tuple[str, float, float]]]:
    """Per query, its candidates as (id, score, probability) in input order.

    ``exact_margin``: the exact-name prior (kronlink.ranking); 0 is the model alone.
    ``retrieval_prior`` with ``retrieval_ranks`` (one row per query): the
    retrieval prior (kronlink.retrieval_prior); None, the default: none."""
    model.eval()
    out: list[list[tuple[str, float, float]]] = []
    for start, chunk, scores, batch in _scored(
        model, queries, batch_size, exact_margin, retrieval_prior, retrieval_ranks
    ):
        probs = masked_log_softmax(scores, batch.candidate_mask).exp()
        for i, q in enumerate(chunk):
            cands = q.candidates or ()
            out.append(
                [(c.id, float(scores[i, j]), float(probs[i, j])) for j, c in enumerate(cands)]
            )
        if on_batch is not None:
            on_batch(min(start + batch_size, len(queries)), len(queries))
    return out


@torch.no_grad()
def evaluate(
    model: Ranker,
    queries: Sequence[Query],
    *,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    exact_margin: float = 0.0,
    on_batch: Callable[[int, int], None] | None = None,
    retrieval_prior: RetrievalPrior | None = None,
    retrieval_ranks: Sequence[Sequence[int] | None] | None = None,
) -> Metrics:
    """Rank every query's candidates with ``model`` and compute the metrics.

    ``exact_margin``: the exact-name prior serving applies (kronlink.ranking);
    the default 0 measures the model alone, as every stored experiment did.
    ``retrieval_prior`` and ``retrieval_ranks``: as in :func:`score_queries`."""
    was_training = model.training
    model.eval()
    ranks: list[int] = []
    try:
        for start, _, scores, batch in _scored(
            model, queries, batch_size, exact_margin, retrieval_prior, retrieval_ranks
        ):
            ranks.extend(rank_of_gold(scores, batch.candidate_mask, batch.labels))
            if on_batch is not None:
                on_batch(min(start + batch_size, len(queries)), len(queries))
    finally:
        model.train(was_training)
    return metrics_from_ranks(ranks, ks)
