"""The paper's λ rule, the data-free rule, Perc. Δ and forgetting reduction
(DESIGN.md section 5; the formulas are written out in docs/experiments.md).

Pure functions on numbers, so the rules can be checked against brute force
without training anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Choice",
    "GridRow",
    "forgetting_reduction",
    "mean_std",
    "perc_delta",
    "select_data_free",
    "select_paper",
]

# Accuracies are k/n fractions: equal ones may differ in the last bits.
_EPS = 1e-9


@dataclass(frozen=True)
class GridRow:
    """One penalised run of a λ search, seen on the dev splits.

    ``lambdas``: one λ per prior task; ``old_dev``: each prior task's dev
    accuracy after training on the new task; ``new_dev``: the new task's.
    """

    lambdas: tuple[float, ...]
    old_dev: tuple[float, ...]
    new_dev: float


@dataclass(frozen=True)
class Choice:
    index: int  # into the rows given
    eligible: bool  # False: no row met the margin, the fallback was taken


def _eligible(rows: Sequence[GridRow], ref_new_dev: float, margin: float) -> list[int]:
    return [i for i, r in enumerate(rows) if r.new_dev >= ref_new_dev - margin - _EPS]


def select_paper(
    rows: Sequence[GridRow],
    ref_new_dev: float,
    ref_old_dev: Sequence[float],
    margin: float = 0.02,
) -> Choice:
    """The paper's rule: among the rows whose new-task dev accuracy is within
    ``margin`` of the unpenalised run's (``ref_new_dev``), the one with the
    least mean drop of the prior tasks' dev accuracy from ``ref_old_dev``
    (their accuracy before the new task):

        E  = {λ : acc_new(λ) >= acc_new(none) - margin}
        λ* = argmin_{λ in E} mean_i (acc_i(before) - acc_i(λ))

    Ties go to the higher new-task accuracy, then to the smaller λ (compared
    as tuples). If E is empty, the row with the highest new-task accuracy
    (ties: smaller λ), flagged ``eligible=False``. It reads the old tasks'
    dev data, which the service never keeps: a research rule.
    """
    if not rows:
        raise ValueError("no rows to select from")

    def drop(r: GridRow) -> float:
        return statistics.fmean(b - a for b, a in zip(ref_old_dev, r.old_dev, strict=True))

    ok = _eligible(rows, ref_new_dev, margin)
    if ok:
        best = min(ok, key=lambda i: (drop(rows[i]), -rows[i].new_dev, rows[i].lambdas))
        return Choice(best, True)
    best = min(range(len(rows)), key=lambda i: (-rows[i].new_dev, rows[i].lambdas))
    return Choice(best, False)


def select_data_free(rows: Sequence[GridRow], ref_new_dev: float, margin: float = 0.02) -> Choice:
    """The rule that needs no old data (the update service's ``lambdas="auto"``):
    the largest λ whose new-task dev accuracy stays within ``margin`` of the
    unpenalised run's,

        λ_df = max {λ : acc_new(λ) >= acc_new(none) - margin},

    the smallest λ if none does. A larger λ never protects less in the
    penalty's own measure (Ω), so the largest admissible one is the most
    protection the new task can afford.
    """
    if not rows:
        raise ValueError("no rows to select from")
    ok = _eligible(rows, ref_new_dev, margin)
    if ok:
        return Choice(max(ok, key=lambda i: rows[i].lambdas), True)
    return Choice(min(range(len(rows)), key=lambda i: rows[i].lambdas), False)


def perc_delta(after: float, single: float) -> float | None:
    """``(acc after - acc of the tier-1 model) / acc of the tier-1 model``;
    None when the tier-1 accuracy is 0 (undefined)."""
    if single <= 0:
        return None
    return (after - single) / single


def forgetting_reduction(
    pairs: Sequence[tuple[float, float]],
) -> tuple[float | None, int]:
    """Mean over orderings of ``1 - drop_method / drop_none``.

    ``pairs``: per ordering, (drop under the method, drop with no penalty),
    each a drop of the old task's test accuracy from its tier-1 model. An
    ordering where the unpenalised run did not forget (``drop_none <= 0``) has
    nothing to reduce and is left out; the count left out is returned too.
    Returns (None, n) when every ordering was left out.
    """
    values = [1 - m / n for m, n in pairs if n > _EPS]
    skipped = len(pairs) - len(values)
    return (statistics.fmean(values) if values else None), skipped


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), 0.0
    return statistics.fmean(values), statistics.stdev(values)
