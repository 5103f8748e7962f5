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
