"""The report's formatting helpers and its main tables (setup, tier 1, the
tier-2/3 accuracy tables, forgetting reduction, the two λ rules); report.py
assembles the section.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from kronlink.experiments.metrics import forgetting_reduction, mean_std, perc_delta
from kronlink.experiments.runner import Results

# The paper's Table 3 headline (arXiv 2111.06012): mean over orderings of
# 1 - drop_method / drop_none. The CNN figures are "about" in the paper's text.
# The paper's KFC is the expand rule: `kfc-expand` since issue 13, and `kfc` in
# configs that predate it (those have no `kfc-expand`; see _paper_figure).
PAPER_FORGETTING_REDUCTION = {
    "transformer": {"kfc-expand": 0.51, "ewc": 0.27},
    "cnn": {"kfc-expand": 0.75, "ewc": 0.35},
}


def paper_kfc(methods: Sequence[str]) -> str:
    """The method that is the paper's KFC (the expand rule) in a config:
    ``kfc-expand`` since issue 13, plain ``kfc`` in configs from before it."""
    return "kfc-expand" if "kfc-expand" in methods else "kfc"


def _paper_figure(kind: str, method: str, methods: Sequence[str]) -> float | None:
    if method == paper_kfc(methods):
        method = "kfc-expand"
    return PAPER_FORGETTING_REDUCTION.get(kind, {}).get(method)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(values: Sequence[float], digits: int = 3, pct: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m, s = mean_std(vals)
    if pct:
        text = f"{100 * m:+.1f}%"
        return text if len(vals) == 1 else f"{text} ± {100 * s:.1f}"
    text = f"{m:.{digits}f}"
    return text if len(vals) == 1 else f"{text} ± {s:.{digits}f}"


def _lam(values: Iterable[Sequence[float]]) -> str:
    seen = sorted({tuple(v) for v in values})
    return (
        "; ".join(
            "(" + ", ".join(f"{x:g}" for x in v) + ")" if len(v) > 1 else f"{v[0]:g}" for v in seen
        )
        or "–"
    )


def _arrow(names: Sequence[str]) -> str:
    return " → ".join(names)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


class _View:
    """Indexes of the results by ranker, for the tables."""

    def __init__(self, res: Results) -> None:
        self.res = res
        cfg = res.config
        self.rule = cfg.tasks.split_rules[0]
        self.rankers = [r for r in cfg.rankers]

    def seeds(self, ranker: str, table: dict, rule: str | None = None) -> list[int]:
        rule = rule or self.rule
        return sorted({k[2] for k in table if k[0] == ranker and k[1] == rule})

    def single(self, ranker: str, seed: int, task: str, split: str = "test") -> float | None:
        rec = self.res.tier1.get((ranker, self.rule, seed, task))
        return rec["metrics"][task][split] if rec else None


def _shown(value: object) -> object:
    """A path under the working folder as a relative path: the report lands in
    docs/, read on other machines, where this checkout's absolute path means
    nothing."""
    if not isinstance(value, str | Path) or not Path(value).is_absolute():
        return value
    try:
        return str(Path(value).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(value)


def _setup(res: Results) -> list[str]:
    cfg = res.config
    t = cfg.tasks
    source = (
        "prebuilt task folders"
        if t.dirs
        else f"{t.candidates} BM25 candidates a query; builder limit "
        f"{t.limit if t.limit is not None else 'none (all mentions)'} (the first N raw "
        "mentions, docs/data.md)"
    )
    lines = [
        f"Config `{_shown(cfg.path) or cfg.name}`; records in `{_shown(cfg.results_dir)}`. "
        f"{cfg.description}".strip(),
        "",
        f"- Tasks: {', '.join(t.names)}; {source}; split rules {', '.join(t.split_rules)} "
        f"(headline: {t.split_rules[0]}); seeded subsets train/dev/test "
        f"{t.train_limit}/{t.dev_limit}/{t.test_limit} (None: all).",
        f"- Seeds: {', '.join(map(str, cfg.seeds))} (training seed: model initialisation and "
        "batch order; the task splits stay fixed). Values are the mean ± sample standard "
        "deviation over seeds where there are several.",
        f"- λ grid {', '.join(f'{v:g}' for v in cfg.selection.grid)}; margin "
        f"{cfg.selection.margin} (accuracy, i.e. {100 * cfg.selection.margin:g} points); tier 3 "
        f"search: {cfg.tier3.search}.",
        f"- Curvature: {', '.join(cfg.curvature.kinds)}, {cfg.curvature.fisher} Fisher, "
        f"include_other={cfg.curvature.include_other}.",
    ]
    for r in cfg.rankers:
        model = {k: _shown(v) for k, v in dict(r.model).items()}
        lines.append(
            f"- Ranker `{r.name}` ({r.kind}): model {model}, training {dict(r.train)}, "
            f"tiers {', '.join(r.tiers)}" + (f", grid {list(r.grid)}" if r.grid else "") + "."
        )
    devices = sorted(
        {rec.get("device", "?") for table in (res.tier1, res.tier2) for rec in table.values()}
    )
    lines.append(f"- Device(s): {', '.join(devices) or '–'}.")
    return lines


def _tier1(v: _View) -> list[str]:
    res = v.res
    lines = ["### Tier 1: one model per task, and one on all tasks (the paper's Table 2)", ""]
    rows = []
    for r in v.rankers:
        for rule in res.config.tasks.split_rules:
            for task in res.config.tasks.names:
                recs = [
                    rec
                    for (rn, ru, _s, tn), rec in res.tier1.items()
                    if rn == r.name and ru == rule and tn == task
                ]
                comb = [
                    rec["metrics"][task]["test"]
                    for (rn, ru, _s), rec in res.combined.items()
                    if rn == r.name and ru == rule
                ]
                if not recs and not comb:
                    continue
                rows.append(
                    [
                        r.name,
                        rule,
                        task,
                        str(recs[0]["metrics"][task]["n_test"]) if recs else "–",
                        _pm([x["metrics"][task]["test"] for x in recs]),
                        _pm([x["metrics"][task]["dev"] for x in recs]),
                        _pm(comb),
                        str(len(recs)),
                    ]
                )
    lines += _table(
        [
            "ranker",
            "split",
            "task",
            "test queries",
            "single-task test acc.",
            "dev acc.",
            "all tasks combined: test acc.",
            "seeds",
        ],
        rows,
    )
    return lines


def _stage_rows(
    v: _View, table: dict, ranker: str, ordering: tuple[str, ...], method: str
) -> tuple[list[dict], list[int]]:
    recs, seeds = [], []
    for (rn, ru, s, o, m), rec in table.items():
        if rn == ranker and ru == v.rule and o == ordering and m == method:
            recs.append(rec)
            seeds.append(s)
    return recs, seeds


def _seq_table(v: _View, tier: str) -> list[str]:
    res = v.res
    table = res.tier2 if tier == "tier2" else res.tier3
    n = 2 if tier == "tier2" else 3
    lines: list[str] = []
    for r in v.rankers:
        keys = sorted({(k[3], k[4]) for k in table if k[0] == r.name and k[1] == v.rule})
        if not keys:
            continue
        orderings = sorted({o for o, _m in keys})
        spec = res.config.tier2 if n == 2 else res.config.tier3
        methods = [m for m in spec.methods if any(mm == m for _o, mm in keys)]
        head = [f"{'A → B' if n == 2 else 'A → B → C'}", "method", "λ chosen"]
        for letter in "ABC"[:n]:
            head += [f"{letter} acc.", f"{letter} Perc. Δ"]
        rows = []
        for o in orderings:
            for m in methods:
                recs, seeds = _stage_rows(v, table, r.name, o, m)
                if not recs:
                    continue
                row = [
                    _arrow(o),
                    m,
                    _lam(rec["spec"]["lambdas"] for rec in recs) if m != "none" else "–",
                ]
                for task in o:
                    accs = [rec["metrics"][task]["test"] for rec in recs]
                    deltas = [
                        perc_delta(a, v.single(r.name, s, task) or 0.0)
                        for a, s in zip(accs, seeds, strict=True)
                    ]
                    row += [_pm(accs), _pm([d for d in deltas if d is not None], pct=True)]
                rows.append(row)
        lines += [f"**{r.name}** ({len(v.seeds(r.name, table))} seed(s))", ""]
        lines += _table(head, rows)
        lines.append("")
    return lines


def _drops(v: _View, table: dict, ranker: str, method: str, prior_positions: Sequence[int]):
    """Per seed: list of (drop_method, drop_none) over (ordering, prior task)."""
    out: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for (rn, ru, s, o, m), rec in table.items():
        if rn != ranker or ru != v.rule or m != method:
            continue
        none = table.get((rn, ru, s, o, "none"))
        if none is None:
            continue
        for i in prior_positions:
            task = o[i]
            single = v.single(ranker, s, task)
            if single is None:
                continue
            out[s].append(
                (single - rec["metrics"][task]["test"], single - none["metrics"][task]["test"])
            )
    return out


def _reduction(v: _View, tier: str) -> list[str]:
    res = v.res
    table = res.tier2 if tier == "tier2" else res.tier3
    positions = [0] if tier == "tier2" else [0, 1]
    spec = res.config.tier2 if tier == "tier2" else res.config.tier3
    rows = []
    for r in v.rankers:
        methods = [m for m in spec.methods if m != "none"]
        for m in methods:
            per_seed = _drops(v, table, r.name, m, positions)
            if not per_seed:
                continue
            values, skipped, used = [], 0, 0
            for pairs in per_seed.values():
                fr, sk = forgetting_reduction(pairs)
                skipped += sk
                used += len(pairs) - sk
                if fr is not None:
                    values.append(fr)
            none_drops = [n for pairs in per_seed.values() for _m, n in pairs]
            paper = _paper_figure(r.kind, m, methods)
            rows.append(
                [
                    r.name,
                    m,
                    _pm(values, pct=True).replace("+", ""),
                    str(len(values)),
                    f"{used} used, {skipped} left out",
                    _pm(none_drops),
                    f"{100 * paper:.0f}%" if paper is not None else "–",
                ]
            )
    what = "orderings" if tier == "tier2" else "(ordering, prior task) pairs"
    paper_col = "paper's figure" if tier == "tier2" else "paper's tier-2 figure (for scale)"
    lines = [
        f"Forgetting reduction = mean over {what} of `1 - drop_method / drop_none`, drops of "
        "the old task's test accuracy from its tier-1 model; pairs where the unpenalised run "
        "did not forget (drop_none <= 0) are left out. The last column is the paper's figure "
        "(its Table 3, BERT and CNN on its own tasks), not ours.",
        "",
    ]
    lines += _table(
        [
            "ranker",
            "method",
            "forgetting reduction (mean ± sd over seeds)",
            "seeds",
            what,
            "drop with no penalty",
            paper_col,
        ],
        rows,
    )
    return lines


def _data_free(v: _View) -> list[str]:
    """Paper rule (needs old dev data) against the data-free rule, on tier 2."""
    res = v.res
    rows = []
    for r in v.rankers:
        for m in [m for m in res.config.tier2.methods if m != "none"]:
            fr = {"paper": defaultdict(list), "free": defaultdict(list)}
            new_acc = {"paper": [], "free": []}
            lam = {"paper": [], "free": []}
            for (rn, ru, s, o, mm), search in res.tier2_search.items():
                if rn != r.name or ru != v.rule or mm != m:
                    continue
                none = res.tier2.get((rn, ru, s, o, "none"))
                single = v.single(rn, s, o[0])
                if none is None or single is None:
                    continue
                drop_none = single - none["metrics"][o[0]]["test"]
                for which, rec in (("paper", search.chosen), ("free", search.chosen_data_free)):
                    fr[which][s].append((single - rec["metrics"][o[0]]["test"], drop_none))
                    new_acc[which].append(rec["metrics"][o[1]]["test"])
                    lam[which].append(tuple(rec["spec"]["lambdas"]))
            if not new_acc["paper"]:
                continue
            means = {}
            for which in ("paper", "free"):
                vals = [
                    x
                    for x in (forgetting_reduction(p)[0] for p in fr[which].values())
                    if x is not None
                ]
                means[which] = vals
            mp, mf = mean_std(means["paper"])[0], mean_std(means["free"])[0]
            share = mf / mp if mp and mp > 0 and not math.isnan(mf) else None
            ap, af = mean_std(new_acc["paper"])[0], mean_std(new_acc["free"])[0]
            rows.append(
                [
                    r.name,
                    m,
                    _pm(means["paper"], pct=True).replace("+", ""),
                    _pm(means["free"], pct=True).replace("+", ""),
                    f"{100 * share:.0f}%" if share is not None else "–",
                    _fmt(ap),
                    _fmt(af),
                    # "equal" at the table's resolution: means of k/n fractions over
                    # different test sets differ in the sixth digit for the same runs.
                    "yes" if share is not None and share >= 0.9 and af >= ap - 5e-4 else "no",
                    _lam(lam["free"]),
                ]
            )
    lines = [
        "The paper's rule reads the old task's dev split; the data-free rule "
        "(`λ_df = max{λ : acc_B(λ) >= acc_B(none) - margin}`, the update service's "
        '`lambdas="auto"`) reads only the new task\'s. Both pick from the same stored runs.',
        "",
    ]
    lines += _table(
        [
            "ranker",
            "method",
            "FR, paper rule",
            "FR, data-free",
            "data-free / paper",
            "new-task test acc., paper rule",
            "new-task test acc., data-free",
            ">= 90% at equal (±0.0005) or better new-task acc.?",
            "λ data-free",
        ],
        rows,
    )
    return lines
