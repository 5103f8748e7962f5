"""The report's pre-registered endpoint section (docs/experiments.md, "The
decisive experiment"): tier-2 pairs from the stored records, the
hierarchical bootstrap and the secondaries of ``endpoint.py``."""

from __future__ import annotations

import statistics

import numpy as np

from kronlink.experiments.endpoint import (
    Pair,
    bootstrap_mean_diff,
    matched_drop,
    pairs_needed,
    reduction_both_ways,
)
from kronlink.experiments.report_tables import _fmt, _table, _View, paper_kfc

__all__ = ["endpoint_pairs", "endpoint_section"]

N_BOOT = 10_000


def _correct(rec: dict, task: str) -> np.ndarray | None:
    ranks = rec["metrics"][task].get("test_ranks")
    return None if ranks is None else (np.asarray(ranks) == 1).astype(float)


def endpoint_pairs(v: _View, ranker: str, first: str, second: str) -> tuple[list[Pair], bool]:
    """(ordering, seed) pairs of tier 2 where both methods' searches are
    stored, each at its data-free λ; ``Pair.diff`` = drop under ``first``
    minus drop under ``second``. The flag is True when every record holds
    per-query ranks (else the pairs hold one-element accuracy arrays)."""
    res = v.res
    pairs, with_ranks = [], True
    for (rn, ru, s, o, m), search in sorted(res.tier2_search.items(), key=lambda kv: str(kv[0])):
        if rn != ranker or ru != v.rule or m != first:
            continue
        other = res.tier2_search.get((rn, ru, s, o, second))
        if other is None:
            continue
        a = o[0]
        r1, r2 = search.chosen_data_free, other.chosen_data_free
        c1, c2 = _correct(r1, a), _correct(r2, a)
        if c1 is None or c2 is None:
            with_ranks = False
            c1 = np.array([r1["metrics"][a]["test"]])
            c2 = np.array([r2["metrics"][a]["test"]])
        pairs.append(Pair(tuple(o), s, c1, c2))
    if not with_ranks:  # mixed records: use accuracies throughout
        pairs = [
            Pair(p.ordering, p.seed, np.array([p.first.mean()]), np.array([p.second.mean()]))
            for p in pairs
        ]
    return pairs, with_ranks


def _ci(b: dict) -> str:
    return f"{100 * b['estimate']:+.2f} [{100 * b['low']:+.2f}, {100 * b['high']:+.2f}]"


def _matched(v: _View, ranker: str, first: str, second: str) -> list[Pair]:
    res, margin = v.res, v.res.config.selection.margin
    out = []
    for (rn, ru, s, o, m), search in sorted(res.tier2_search.items(), key=lambda kv: str(kv[0])):
        if rn != ranker or ru != v.rule or m != first:
            continue
        other = res.tier2_search.get((rn, ru, s, o, second))
        none = res.tier2.get((rn, ru, s, o, "none"))
        if other is None or none is None:
            continue
        a, b = o
        target = none["metrics"][b]["test"] - margin
        old = [
            matched_drop(
                [(r["metrics"][b]["test"], r["metrics"][a]["test"]) for r in x.rows], target
            )
            for x in (search, other)
        ]
        out.append(Pair(tuple(o), s, np.array([old[0]]), np.array([old[1]])))
    return out


def _reductions(v: _View, ranker: str, method: str) -> tuple[float | None, float | None, int]:
    res, drops = v.res, []
    for (rn, ru, s, o, m), search in res.tier2_search.items():
        if rn != ranker or ru != v.rule or m != method:
            continue
        none = res.tier2.get((rn, ru, s, o, "none"))
        single = v.single(rn, s, o[0])
        if none is None or single is None:
            continue
        rec = search.chosen_data_free
        drops.append(
            (single - rec["metrics"][o[0]]["test"], single - none["metrics"][o[0]]["test"])
        )
    mr, rm = reduction_both_ways(drops)
    return mr, rm, len(drops)


def endpoint_section(v: _View) -> list[str]:
    """Markdown lines (empty when no ranker has both EWC and KFC searches)."""
    methods = [m for m in v.res.config.tier2.methods if m != "none"]
    comparisons = [("ewc", m) for m in methods if m != "ewc"]
    kfc = paper_kfc(methods)  # the registered KFC is the paper's expand rule
    comparisons += [(kfc, m) for m in methods if m not in ("ewc", kfc)]
    rows, secondary, fr_rows = [], [], []
    for r in v.rankers:
        for first, second in comparisons:
            pairs, with_ranks = endpoint_pairs(v, r.name, first, second)
            if not pairs:
                continue
            boot = bootstrap_mean_diff(pairs, n_boot=N_BOOT, queries=with_ranks)
            diffs = [p.diff for p in pairs]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            need = pairs_needed(sd * 100, 1.3) if len(diffs) > 1 and sd > 0 else None
            primary = (first, second) == ("ewc", kfc)
            rows.append(
                [
                    r.name,
                    f"{first} − {second}" + (" (primary)" if primary else ""),
                    str(boot["pairs"]),
                    str(boot["orderings"]),
                    _ci(boot),
                    _fmt(100 * sd, 2),
                    str(need) if need is not None else "–",
                    "seeds and queries" if with_ranks else "seeds only (no per-query ranks stored)",
                ]
            )
            matched = _matched(v, r.name, first, second)
            if matched:
                mb = bootstrap_mean_diff(matched, n_boot=N_BOOT, queries=False)
                secondary.append([r.name, f"{first} − {second}", str(mb["pairs"]), _ci(mb)])
        for m in methods:
            mr, rm, n = _reductions(v, r.name, m)
            if n:
                fr_rows.append(
                    [
                        r.name,
                        m,
                        str(n),
                        f"{100 * mr:.0f}%" if mr is not None else "–",
                        f"{100 * rm:.0f}%" if rm is not None else "–",
                    ]
                )
    if not rows:
        return []
    lines = [
        "The endpoint pre-registered for the decisive experiment (docs/experiments.md), "
        "computed on this config's records (the registered test is experiments/decisive.toml "
        "alone). Per (ordering, seed) pair: the old task's test drop under the first method minus under the second, "
        "each at its data-free λ, in points; mean over pairs with a 95% hierarchical bootstrap "
        f"interval ({N_BOOT:,} draws: seeds within orderings, then test queries within each "
        "drawn pair from the stored per-query ranks). Positive: the second method forgets "
        "less. 'pairs for 1.3' is the number of pairs a paired test at α = 0.05 needs for "
        "power 0.8 at this between-pair sd. With few seeds per ordering, a bootstrap over "
        "seeds alone understates the spread.",
        "",
    ]
    lines += _table(
        [
            "ranker",
            "drop difference",
            "pairs",
            "orderings",
            "estimate [95% CI], points",
            "between-pair sd",
            "pairs for 1.3",
            "bootstrap over",
        ],
        rows,
    )
    if secondary:
        lines += [
            "",
            "At matched new-task accuracy (each λ front interpolated at B's unpenalised test "
            "accuracy minus the margin; bootstrap over seeds within orderings):",
            "",
        ]
        lines += _table(
            ["ranker", "old-task difference", "pairs", "estimate [95% CI], points"], secondary
        )
    if fr_rows:
        lines += ["", "Forgetting reduction at the data-free λ, both ways:", ""]
        lines += _table(["ranker", "method", "pairs", "mean of ratios", "ratio of means"], fr_rows)
    return lines
