"""The pre-registered endpoint's statistics (kronlink/experiments/endpoint.py)
against brute force on fresh random inputs: the hierarchical bootstrap's
mean and sd against the exact moments of the bootstrap distribution,
enumerated; the power formula against scipy's noncentral t."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pytest
from scipy import stats

from kronlink.experiments.endpoint import (
    Pair,
    bootstrap_mean_diff,
    matched_drop,
    pairs_needed,
    reduction_both_ways,
)


def _unit_moments(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """Mean and variance of mean(second[q] - first[q]) over every one of the
    Q^Q ordered query draws with replacement (brute force)."""
    q = len(first)
    vals = [
        statistics.fmean(second[i] - first[i] for i in draw)
        for draw in itertools.product(range(q), repeat=q)
    ]
    return statistics.fmean(vals), statistics.pvariance(vals)


def _exact(pairs: list[Pair], queries: bool) -> tuple[float, float]:
    """Exact mean and variance of the bootstrap statistic: per ordering, every
    ordered draw of its seeds; given the draw, the units' query resamples
    are independent, so the conditional moments add."""
    groups: dict[tuple, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.ordering, []).append(p)
    mean_total, var_total = 0.0, 0.0
    for group in groups.values():
        n = len(group)
        mom = [_unit_moments(p.first, p.second) if queries else (p.diff, 0.0) for p in group]
        cond_means, cond_vars = [], []
        for draw in itertools.product(range(n), repeat=n):
            cond_means.append(sum(mom[j][0] for j in draw))
            cond_vars.append(sum(mom[j][1] for j in draw))
        mean_total += statistics.fmean(cond_means)
        var_total += statistics.fmean(cond_vars) + statistics.pvariance(cond_means)
    n_pairs = len(pairs)
    return mean_total / n_pairs, var_total / n_pairs**2


def _random_pairs(rng: np.random.Generator, n_queries: int) -> list[Pair]:
    pairs = []
    for o, n_seeds in ((("a", "b"), 3), (("b", "a"), 2), (("a", "c"), 2)):
        for s in range(n_seeds):
            pairs.append(
                Pair(o, s, rng.integers(0, 2, n_queries).astype(float),
                     rng.integers(0, 2, n_queries).astype(float))
            )  # fmt: skip
    return pairs


@pytest.mark.parametrize("queries", [True, False])
def test_bootstrap_matches_the_exact_bootstrap_moments(queries: bool) -> None:
    rng = np.random.default_rng()
    pairs = _random_pairs(rng, n_queries=4)
    while statistics.pstdev(p.diff for p in pairs) == 0:
        pairs = _random_pairs(rng, n_queries=4)
    mean, var = _exact(pairs, queries)
    n_boot = 40_000
    boot = bootstrap_mean_diff(
        pairs, n_boot=n_boot, seed=int(rng.integers(1 << 30)), queries=queries
    )
    assert boot["estimate"] == pytest.approx(statistics.fmean(p.diff for p in pairs), abs=1e-12)
    # Monte Carlo error of the draws' mean: sd / sqrt(n_boot); of their sd: about sd / sqrt(2 n_boot).
    sd = var**0.5
    assert abs(boot["mean"] - mean) < 5 * sd / n_boot**0.5 + 1e-12
    assert boot["sd"] == pytest.approx(sd, rel=5 / (2 * n_boot) ** 0.5)
    assert boot["low"] <= boot["estimate"] <= boot["high"]
    assert boot["pairs"] == 7 and boot["orderings"] == 3


def test_query_resampling_widens_the_interval() -> None:
    rng = np.random.default_rng()
    pairs = _random_pairs(rng, n_queries=200)
    with_q = bootstrap_mean_diff(pairs, n_boot=4000, queries=True)
    without = bootstrap_mean_diff(pairs, n_boot=4000, queries=False)
    assert with_q["sd"] > without["sd"]
    assert with_q["sd"] ** 2 == pytest.approx(_exact(pairs, False)[1] + _within(pairs), rel=0.15)


def _within(pairs: list[Pair]) -> float:
    """Mean over seed draws of the summed per-unit query variance / N^2: each
    unit's query variance is var(second - first) / Q (plug-in)."""
    groups: dict[tuple, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.ordering, []).append(p)
    total = 0.0
    for g in groups.values():
        v = [np.var(p.second - p.first) / len(p.first) for p in g]
        total += len(g) * statistics.fmean(v)
    return total / len(pairs) ** 2


def test_runs_on_different_queries_are_refused() -> None:
    a = Pair(("a", "b"), 0, np.ones(3), np.zeros(3))
    b = Pair(("a", "b"), 1, np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match="differ in their test queries"):
        bootstrap_mean_diff([a, b], n_boot=10)


@pytest.mark.parametrize(("sd", "effect"), [(1.449, 1.3), (1.04, 1.3), (3.05, 1.3), (2.0, 0.5)])
def test_pairs_needed_is_within_one_of_the_noncentral_t(sd: float, effect: float) -> None:
    def power(n: int) -> float:
        df, crit = n - 1, stats.t.ppf(0.975, n - 1)
        nc = effect / sd * n**0.5
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)

    exact = next(n for n in range(2, 10_000) if power(n) >= 0.8)
    assert abs(pairs_needed(sd, effect) - exact) <= 1


def test_reduction_both_ways_and_matched_drop_by_hand() -> None:
    rng = np.random.default_rng()
    drops = [(float(m), float(n)) for m, n in rng.uniform(-0.02, 0.1, size=(9, 2))]
    mr, rm = reduction_both_ways(drops)
    kept = [1 - m / n for m, n in drops if n > 1e-9]
    assert mr == pytest.approx(sum(kept) / len(kept))
    assert rm == pytest.approx(1 - sum(m for m, _ in drops) / sum(n for _, n in drops))
    assert reduction_both_ways([(0.1, 0.0)]) == (None, None)
    # front of (new acc., old acc.): interpolation by hand between bracketing points
    xs = np.sort(rng.uniform(0.3, 0.6, 5))
    ys = rng.uniform(0.1, 0.5, 5)
    t = float(rng.uniform(xs[0], xs[-1]))
    i = int(np.searchsorted(xs, t)) - 1
    i = min(max(i, 0), 3)
    want = ys[i] + (ys[i + 1] - ys[i]) * (t - xs[i]) / (xs[i + 1] - xs[i])
    front = list(zip(xs[::-1], ys[::-1], strict=True))  # order must not matter
    assert matched_drop(front, t) == pytest.approx(want)
    assert matched_drop(front, xs[0] - 1) == pytest.approx(ys[0])  # clipped
