"""The retrieval prior (kronlink/retrieval_prior.py, issue 12 item 3: the ranker
is never worse than its retriever).

The fit is checked against a brute force written apart from it on random
inputs; the scores against a hand sum on a ranker whose scores are known;
serving against evaluation; and the update job on a real ICD-10-CM task, where
the served test top-1 must reach the retriever's while the same version
without the prior falls below it."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kronlink.data.schema import Candidate, Concept, Query
from kronlink.evaluation import evaluate, score_queries
from kronlink.models.base import Ranker, RankerBatch
from kronlink.ranking import rank_scores
from kronlink.retrieval_prior import (
    BETA_GRID,
    RetrievalPrior,
    fit_retrieval_prior,
    retrieval_ranks,
)


class TableRanker(Ranker):
    """Scores a candidate by its name, from a fixed table."""

    kind = "table"

    def __init__(self, table: dict[str, float]) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode(self, queries):
        width = max(len(q.candidates or ()) for q in queries)
        scores = torch.zeros((len(queries), width))
        mask = torch.zeros((len(queries), width), dtype=torch.bool)
        for i, q in enumerate(queries):
            for j, c in enumerate(q.candidates or ()):
                scores[i, j], mask[i, j] = self.table[c.name], True
        labels = torch.tensor([q.gold_index() for q in queries])
        return RankerBatch({"scores": scores}, mask, labels)

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        return batch.features["scores"] + self.anchor


def _brute(scores, ranks, gold, beta):
    """(right, mean NLL of the gold where present), one query at a time."""
    right, nll, n_gold = 0, 0.0, 0
    for s, r, g in zip(scores, ranks, gold, strict=True):
        if g < 0:
            continue
        total = [x - beta * math.log(1 + k) if beta else x for x, k in zip(s, r, strict=True)]
        if all(total[g] > t for j, t in enumerate(total) if j != g):
            right += 1
        top = max(total)
        nll += top + math.log(sum(math.exp(t - top) for t in total)) - total[g]
        n_gold += 1
    return right, nll / max(n_gold, 1)


def _random_case(rng: random.Random):
    n = rng.randint(1, 40)
    scores, ranks, gold = [], [], []
    for _ in range(n):
        width = rng.randint(1, 12)
        scores.append([rng.gauss(0, rng.choice((0.1, 1.0, 5.0))) for _ in range(width)])
        rk = list(range(width))
        rng.shuffle(rk)
        if width > 2 and rng.random() < 0.3:  # candidates the retriever did not return
            for j in rng.sample(range(width), 2):
                rk[j] = width
        ranks.append(rk)
        gold.append(rng.randrange(-1, width))
    return scores, ranks, gold


def test_fit_is_the_brute_force_argmax_and_never_below_model_or_retriever() -> None:
    rng = random.Random(0)
    for trial in range(60):
        scores, ranks, gold = _random_case(rng)
        prior = fit_retrieval_prior(scores, ranks, gold)
        n = len(scores)
        betas = [row["beta"] for row in prior.info["grid"]]
        assert betas[0] == 0.0 and set(BETA_GRID) <= set(betas)
        brute = {b: _brute(scores, ranks, gold, b) for b in betas}
        for row in prior.info["grid"]:
            right, nll = brute[row["beta"]]
            assert row["dev_top1"] == right / n
            assert row["dev_nll"] == pytest.approx(nll, rel=1e-9, abs=1e-9)
        best = min(betas, key=lambda b: (-brute[b][0], brute[b][1], b))
        assert prior.beta == best, trial
        model = brute[0.0][0]
        retriever = sum(
            1 for r, g in zip(ranks, gold, strict=True) if g >= 0 and r[g] == 0 and r.count(0) == 1
        )
        assert prior.info["dev_top1_retriever"] == retriever / n
        assert brute[best][0] >= max(model, retriever), (trial, brute, retriever)
        # the largest beta reproduces the retriever's order on every query
        big = prior.info["order_beta"]
        for s, r in zip(scores, ranks, strict=True):
            if r.count(0) == 1:
                total = [x - big * math.log(1 + k) for x, k in zip(s, r, strict=True)]
                assert r[total.index(max(total))] == 0


def test_the_fit_prefers_the_lower_nll_among_equal_top1_and_needs_dev_queries() -> None:
    # Gold first for the model and the retriever: every beta gets 2/2, and the
    # NLL falls as beta grows until the order-reproducing value (it only sharpens).
    scores, ranks, gold = [[1.0, 0.0], [2.0, 0.0]], [[0, 1], [0, 1]], [0, 0]
    prior = fit_retrieval_prior(scores, ranks, gold)
    assert prior.info["dev_top1"] == 1.0
    assert prior.beta == max(row["beta"] for row in prior.info["grid"])
    with pytest.raises(ValueError, match="at least one dev query"):
        fit_retrieval_prior([], [], [])
    with pytest.raises(ValueError, match="2 scores but 1 ranks"):
        fit_retrieval_prior([[1.0, 0.0]], [[0]], [0])


def test_record_round_trips_and_refuses_bad_values() -> None:
    p = RetrievalPrior(0.5, info={"n_dev": 3})
    assert RetrievalPrior.from_dict(p.as_dict()) == p
    for bad in ({"beta": -1.0}, {"beta": float("inf")}, {"beta": 1.0, "kind": "table"}, {}):
        with pytest.raises(ValueError):
            RetrievalPrior.from_dict(bad)


NAMES = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 2.0}


def _query(names: str, gold: str, mention: str = "x") -> Query:
    return Query(mention, gold, "", "", tuple(Candidate(n, n) for n in names))


def test_rank_scores_adds_beta_times_minus_log_one_plus_rank_where_ranks_are_given() -> None:
    model = TableRanker(NAMES)
    queries = [_query("abcd", "a"), _query("dcb", "b"), _query("ab", "a")]
    ranks = [[0, 1, 2, 3], None, [1, 0]]  # None: the caller's own candidates
    prior = RetrievalPrior(2.0)
    with torch.no_grad():
        plain, _ = rank_scores(model, queries, exact_margin=0.0)
        got, batch = rank_scores(
            model, queries, exact_margin=0.0, retrieval_prior=prior, retrieval_ranks=ranks
        )
    for i, q in enumerate(queries):
        for j, c in enumerate(q.candidates):
            want = NAMES[c.name] - (2.0 * math.log(1 + ranks[i][j]) if ranks[i] else 0.0)
            assert float(got[i, j]) == pytest.approx(want, abs=1e-6)
    # padding positions are left alone
    assert torch.equal(got[~batch.candidate_mask], plain[~batch.candidate_mask])
    with pytest.raises(ValueError, match="one row per query"):
        rank_scores(model, queries, exact_margin=0.0, retrieval_prior=prior, retrieval_ranks=[])
    # evaluation ranks with the same sum: "a" (0.0) is first only with the prior
    assert evaluate(model, queries[:1]).accuracy == 0.0
    assert evaluate(model, queries[:1], retrieval_prior=prior, retrieval_ranks=ranks[:1]).n == 1
    served = evaluate(
        model, queries[:1], retrieval_prior=RetrievalPrior(4.0), retrieval_ranks=ranks[:1]
    )
    assert served.accuracy == 1.0
    rows = score_queries(model, queries, retrieval_prior=prior, retrieval_ranks=ranks)
    assert [s for _, s, _ in rows[0]] == pytest.approx(got[0].tolist(), abs=1e-6)


def test_retrieval_ranks_recover_the_retrievers_order_from_shuffled_candidates() -> None:
    from kronlink.data.candidates import CandidateIndex, attach_candidates

    concepts = [Concept(f"C{i}", f"{w} disease") for i, w in enumerate("abcdefghij")]
    concepts += [Concept("X", "disease of the heart"), Concept("Y", "heart failure")]
    index = CandidateIndex(concepts)
    by_id = {c.id: c for c in concepts}
    queries = [Query("heart disease", "X"), Query("f disease", "C5")]
    attached = attach_candidates(queries, index, by_id, 5, insert_gold=False, seed=3)
    ranks = retrieval_ranks(attached, index)
    for q, rk in zip(attached, ranks, strict=True):
        by_rank = [c.id for _, c in sorted(zip(rk, q.candidates, strict=True))]
        assert by_rank == [cid for cid, _ in index.search([q.mention], 5)[0]]
    # a candidate the retriever does not return ranks after all it does
    top = index.search(["heart disease"], 2)[0]
    own = Query(
        "heart disease",
        "X",
        candidates=(Candidate("NOPE", "nothing"), *(Candidate(i, by_id[i].name) for i, _ in top)),
    )
    assert retrieval_ranks([own], index)[0] == [3, 0, 1]


def test_serving_applies_the_versions_prior_to_generated_candidates_only() -> None:
    from kronlink.registry.records import OntologyInfo
    from kronlink.retrieval import Retriever
    from service.batching import LinkItem, rank_items
    from service.holder import LoadedModel, retrieval_prior_of
    from service.ontologies import OntologyIndex

    concepts = [Concept("1", "heart failure"), Concept("2", "kidney failure")]
    info = OntologyInfo(1, "toy", None, len(concepts), datetime.now(UTC))
    index = OntologyIndex(info, Retriever(concepts), {c.id: c for c in concepts})
    table = {"heart failure": 0.0, "kidney failure": 1.0}  # the model prefers "kidney"

    def version(metrics):  # the fields retrieval_prior_of reads
        return SimpleNamespace(number=1, id=1, metrics=metrics)

    prior = retrieval_prior_of(version({"retrieval_prior": RetrievalPrior(2.0).as_dict()}))
    assert prior == RetrievalPrior(2.0)
    # unreadable: logged, served without one
    assert retrieval_prior_of(version({"retrieval_prior": {"beta": -3}})) is None
    assert retrieval_prior_of(version({})) is None
    model = LoadedModel(version=None, ranker=TableRanker(table), retrieval_prior=prior)  # type: ignore[arg-type]
    assert [c.id for c in index.candidates(["heart failure"], 2)[0]] == ["1", "2"]
    given = tuple(Candidate(c.id, c.name) for c in concepts)
    items = [
        LinkItem("heart failure", index=index, k=2),
        LinkItem("heart failure", candidates=given),
    ]
    served = rank_items(model, items, 8)
    # generated: retriever first (rank 0) gets 0, rank 1 gets -2 log 2: 0 > 1 - 1.386
    assert served[0][0]["id"] == "1"
    assert served[0][1]["score"] == pytest.approx(1.0 - 2.0 * math.log(2), abs=1e-6)
    # given: the caller's order is no retriever's; the model alone decides
    assert served[1][0]["id"] == "2" and served[1][0]["score"] == pytest.approx(1.0)
    bare = LoadedModel(version=None, ranker=TableRanker(table))  # type: ignore[arg-type]
    assert rank_items(bare, items[:1], 8)[0][0]["id"] == "2"
