"""The λ rules, Perc. Δ and forgetting reduction against brute force on
made-up dev numbers (DESIGN.md section 5, docs/experiments.md)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlink.experiments.metrics import (
    GridRow,
    forgetting_reduction,
    perc_delta,
    select_data_free,
    select_paper,
)

TOL = 1e-12
# Accuracies as k/n of a 50-query dev split: ties are frequent, as in real runs.
acc = st.integers(0, 50).map(lambda k: k / 50)
GRID = (1e1, 1e3, 1e5, 1e7, 1e9)


@st.composite
def searches(draw):
    priors = draw(st.integers(1, 2))
    lambdas = (
        [(v,) for v in GRID]
        if priors == 1
        else draw(
            st.sampled_from([[(1e1, v) for v in GRID], list(itertools.product(GRID[:3], GRID[:3]))])
        )
    )
    rows = [GridRow(lam, tuple(draw(acc) for _ in range(priors)), draw(acc)) for lam in lambdas]
    return (
        rows,
        draw(acc),
        tuple(draw(acc) for _ in range(priors)),
        draw(st.sampled_from([0.0, 0.02, 0.1])),
    )


def brute_paper(rows, ref_new, ref_old, margin):
    """The rule written out with loops: indices of every acceptable answer."""
    eligible = [i for i in range(len(rows)) if rows[i].new_dev >= ref_new - margin - 1e-9]
    pool = eligible or list(range(len(rows)))
    if eligible:
        drops = {
            i: sum(ref_old[j] - rows[i].old_dev[j] for j in range(len(ref_old))) / len(ref_old)
            for i in pool
        }
        best = min(drops.values())
        pool = [i for i in pool if drops[i] <= best + TOL]
    top = max(rows[i].new_dev for i in pool)
    pool = [i for i in pool if rows[i].new_dev >= top - TOL]
    smallest = min(rows[i].lambdas for i in pool)
    return {i for i in pool if rows[i].lambdas == smallest}, bool(eligible)


@settings(max_examples=150, deadline=None)
@given(searches())
def test_paper_rule_matches_brute_force(case) -> None:
    rows, ref_new, ref_old, margin = case
    choice = select_paper(rows, ref_new, ref_old, margin)
    answers, eligible = brute_paper(rows, ref_new, ref_old, margin)
    assert choice.index in answers
    assert choice.eligible == eligible


@settings(max_examples=150, deadline=None)
@given(searches())
def test_data_free_rule_matches_brute_force(case) -> None:
    rows, ref_new, _ref_old, margin = case
    choice = select_data_free(rows, ref_new, margin)
    eligible = [i for i, r in enumerate(rows) if r.new_dev + margin + 1e-9 >= ref_new]
    if eligible:
        assert rows[choice.index].lambdas == max(rows[i].lambdas for i in eligible)
        assert choice.eligible
    else:
        assert rows[choice.index].lambdas == min(r.lambdas for r in rows)
        assert not choice.eligible


def test_paper_rule_by_hand() -> None:
    # unpenalised: new-task dev 0.60; old task was 0.50 before.
    rows = [
        GridRow((1e1,), (0.40,), 0.60),  # drop 0.10
        GridRow((1e3,), (0.46,), 0.59),  # drop 0.04, within 2 points
        GridRow((1e5,), (0.48,), 0.57),  # drop 0.02, but 3 points below: not eligible
        GridRow((1e7,), (0.49,), 0.30),
    ]
    assert select_paper(rows, 0.60, (0.50,), 0.02).index == 1
    # The data-free rule cannot see the old task: largest admissible λ.
    assert select_data_free(rows, 0.60, 0.02).index == 1
    assert select_data_free(rows, 0.60, 0.05).index == 2
    # Nothing within the margin: the best new-task accuracy, flagged.
    c = select_paper(rows, 0.70, (0.50,), 0.02)
    assert (c.index, c.eligible) == (0, False)


def test_perc_delta_and_forgetting_reduction() -> None:
    assert perc_delta(0.3, 0.4) == pytest.approx(-0.25)
    assert perc_delta(0.3, 0.0) is None
    # drops (method, none): reductions 0.5 and 0.75; the third ordering did not
    # forget without a penalty, so it has nothing to reduce and is left out.
    fr, skipped = forgetting_reduction([(0.05, 0.10), (0.01, 0.04), (0.02, -0.01)])
    assert fr == pytest.approx(0.625)
    assert skipped == 1
    # A method that forgets more than none has a negative reduction.
    assert forgetting_reduction([(0.2, 0.1)])[0] == pytest.approx(-1.0)
    assert forgetting_reduction([(0.1, 0.0)]) == (None, 1)
