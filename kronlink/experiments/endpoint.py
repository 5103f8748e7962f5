"""The pre-registered endpoint of docs/experiments.md ("The decisive
experiment"), computed from stored tier-2 records only.

Primary: per (ordering, seed) pair, the old task's test drop under EWC minus
its drop under KFC, each at its data-free-chosen λ. Both drops are from the
same tier-1 model, so the difference is ``acc_KFC(A) - acc_EWC(A)`` on the
same test queries. Its confidence interval is a hierarchical bootstrap:
orderings are fixed strata; within each ordering the seeds are resampled
with replacement, and within each drawn (ordering, seed) unit the old task's
test queries are resampled with replacement from the stored per-query ranks
(the same query draw for both methods: the comparison is paired).

Secondaries: forgetting reduction as the mean of ratios and as the ratio of
means; the paired difference at matched new-task accuracy, from each λ
front interpolated to the unpenalised run's new-task accuracy minus the
margin; and the primary for any further method against EWC.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Pair",
    "bootstrap_mean_diff",
    "matched_drop",
    "pairs_needed",
    "reduction_both_ways",
]


@dataclass(frozen=True)
class Pair:
    """One (ordering, seed) unit: the old task's per-query correctness (rank
    1) after each of the two runs compared, on the same test queries.
    ``first`` and ``second`` are 0/1 arrays; the statistic is
    ``mean(second) - mean(first)`` (for EWC vs KFC: EWC's drop minus KFC's)."""

    ordering: tuple[str, ...]
    seed: int
    first: np.ndarray
    second: np.ndarray

    @property
    def diff(self) -> float:
        return float(self.second.mean() - self.first.mean())


def _by_ordering(pairs: Sequence[Pair]) -> list[list[Pair]]:
    groups: dict[tuple[str, ...], list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.ordering, []).append(p)
    return list(groups.values())


def bootstrap_mean_diff(
    pairs: Sequence[Pair],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    queries: bool = True,
    level: float = 0.95,
) -> dict:
    """Point estimate (mean over pairs of ``Pair.diff``), the bootstrap draws'
    mean and sd, and the percentile interval at ``level``. ``queries=False`` resamples
    seeds only (records without per-query ranks)."""
    if not pairs:
        raise ValueError("no pairs to bootstrap")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for group in _by_ordering(pairs):
        n = len(group)
        pick = rng.integers(n, size=(n_boot, n))  # seeds within the ordering
        if not queries:
            diffs = np.array([p.diff for p in group])
            total += diffs[pick].sum(axis=1)
            continue
        n_q = len(group[0].first)
        if any(len(p.first) != n_q or len(p.second) != n_q for p in group):
            raise ValueError(f"ordering {group[0].ordering}: runs differ in their test queries")
        first = np.stack([p.first for p in group]).astype(float)
        second = np.stack([p.second for p in group]).astype(float)
        for j in range(n):
            q = rng.integers(n_q, size=(n_boot, n_q))
            unit = pick[:, j]
            total += (second[unit[:, None], q] - first[unit[:, None], q]).mean(axis=1)
    draws = total / len(pairs)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return {
        "estimate": statistics.fmean(p.diff for p in pairs),
        "mean": float(draws.mean()),  # of the draws: the estimate, up to Monte Carlo error
        "sd": float(draws.std(ddof=1)),
        "low": float(lo),
        "high": float(hi),
        "pairs": len(pairs),
        "orderings": len(_by_ordering(pairs)),
        "queries_resampled": queries,
        "n_boot": n_boot,
    }


def reduction_both_ways(drops: Sequence[tuple[float, float]]) -> tuple[float | None, float | None]:
    """Forgetting reduction from (drop_method, drop_none) per pair: the mean of
    ``1 - m/n`` over pairs with ``n > 0`` (the paper's), and ``1 - mean(m) /
    mean(n)`` over all pairs (None where undefined)."""
    ratios = [1 - m / n for m, n in drops if n > 1e-9]
    mean_of_ratios = statistics.fmean(ratios) if ratios else None
    mean_none = statistics.fmean(n for _m, n in drops) if drops else 0.0
    ratio_of_means = (
        1 - statistics.fmean(m for m, _n in drops) / mean_none if mean_none > 1e-9 else None
    )
    return mean_of_ratios, ratio_of_means


def matched_drop(front: Sequence[tuple[float, float]], target_new: float) -> float:
    """The old task's accuracy at new-task accuracy ``target_new``, linearly
    interpolated along a λ front of (new acc., old acc.) points; clipped to
    the nearest end outside the front's range. Points at the same new-task
    accuracy are averaged first."""
    if not front:
        raise ValueError("empty front")
    by_new: dict[float, list[float]] = {}
    for new, old in front:
        by_new.setdefault(float(new), []).append(float(old))
    xs = sorted(by_new)
    ys = [statistics.fmean(by_new[x]) for x in xs]
    return float(np.interp(target_new, xs, ys))


def pairs_needed(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Pairs for a two-sided paired t-test at ``alpha`` to detect a mean
    difference ``effect`` with ``power``, given the between-pair sd:
    Guenther's approximation ``((z_a + z_b) sd / effect)^2 + z_a^2 / 2``,
    rounded up (within one pair of the exact noncentral-t answer; the test
    checks it against scipy's)."""
    if sd <= 0 or effect <= 0:
        raise ValueError("sd and effect must be positive")
    z = statistics.NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    return math.ceil(((za + zb) * sd / effect) ** 2 + za**2 / 2)
