import random

import pytest
import torch

from kronlink.evaluation import metrics_from_ranks, rank_of_gold


def _brute_rank(scores: list[float], n_real: int, gold: int) -> int:
    if gold < 0:
        return 0
    real = scores[:n_real]
    # ties count against the gold: its rank is the number of candidates scoring >= it
    return sum(1 for s in real if s >= real[gold])


@pytest.mark.parametrize("seed", range(5))
def test_rank_of_gold_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    b, c = 17, 9
    scores = torch.randn(b, c, generator=torch.Generator().manual_seed(seed))
    scores[0, :] = 0.5  # a row of ties
    counts = [rng.randint(1, c) for _ in range(b)]
    mask = torch.tensor([[j < n for j in range(c)] for n in counts])
    labels = torch.tensor([rng.randint(-1, n - 1) for n in counts])
    # padded entries may hold anything, even huge scores: they must not count
    scores = scores.masked_fill(~mask, 1e9)
    got = rank_of_gold(scores, mask, labels)
    want = [_brute_rank(scores[i].tolist(), counts[i], int(labels[i])) for i in range(b)]
    assert got == want
    assert got[0] in (0, counts[0])  # all tied: worst rank, never 1 unless alone


def test_metrics_from_ranks() -> None:
    ranks = [1, 2, 0, 1, 11, 5]
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert m.n == 6
    assert m.accuracy == pytest.approx(2 / 6)
    assert m.mrr == pytest.approx((1 + 0.5 + 1 + 1 / 11 + 0.2) / 6)
    assert m.recall == {1: pytest.approx(2 / 6), 5: pytest.approx(4 / 6), 10: pytest.approx(4 / 6)}
    assert metrics_from_ranks([]).n == 0


def _random_split(seed: int):
    """Queries over candidates whose table scores tie often (one decimal),
    some with the gold missing from their candidates, some with no gold."""
    from test_ranking import TableRanker

    from kronlink.data.schema import Candidate, Query

    rng = random.Random(seed)
    names = [f"concept {i}" for i in range(40)]
    table = {n: round(rng.uniform(-1, 1), 1) for n in names}
    queries = []
    for qi in range(60):
        picked = rng.sample(range(40), rng.randint(1, 8))
        cands = tuple(Candidate(f"C{i}", names[i]) for i in picked)
        gold = rng.choice([f"C{picked[0]}", f"C{rng.randrange(40)}", None])
        # some mentions equal a candidate's name: the exact-name prior acts
        mention = names[picked[-1]] if rng.random() < 0.3 else f"mention {qi}"
        queries.append(Query(mention, gold=gold, candidates=cands))
    return TableRanker(table), queries


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [0.0, 0.35])
def test_metrics_from_scored_equal_evaluates(seed: int, margin: float) -> None:
    from kronlink.evaluation import evaluate, metrics_from_scored, score_queries

    model, queries = _random_split(seed)
    scored = score_queries(model, queries, batch_size=7, exact_margin=margin)
    want = evaluate(model, queries, batch_size=11, exact_margin=margin)
    assert 0 < want.accuracy < 1  # ties and misses both occur: the rule is exercised
    assert metrics_from_scored(queries, scored).as_dict() == want.as_dict()


@pytest.mark.parametrize("seed", range(3))
def test_top1_right_is_the_served_answer_against_the_gold(seed: int) -> None:
    from kronlink.evaluation import score_queries, top1_right

    model, queries = _random_split(seed)
    scored = score_queries(model, queries)
    want = []
    for q, cands in zip(queries, scored, strict=True):
        best = max(s for _, s, _ in cands)
        first = next(cid for cid, s, _ in cands if s == best)  # first on a tie
        want.append(first == q.gold)
    got = top1_right(queries, scored)
    assert got == want
    assert 0 < sum(got) < len(got)
