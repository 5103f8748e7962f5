"""``docs/results.md`` sections from stored runs: the paper's tables (accuracy
and Perc. Δ per task), forgetting reduction beside the paper's figures, the
λ chosen, seeds and spread, wall time, and PNG charts.

A config's section sits between two marker comments; writing it again
replaces only that section, so the rest of the page is kept.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from kronlink.experiments.metrics import forgetting_reduction, mean_std, perc_delta
from kronlink.experiments.runner import Results

__all__ = ["PAPER_FORGETTING_REDUCTION", "render_report", "write_section"]

# The paper's Table 3 headline (arXiv 2111.06012): mean over orderings of
# 1 - drop_method / drop_none. The CNN figures are "about" in the paper's text.
PAPER_FORGETTING_REDUCTION = {
    "transformer": {"kfc": 0.51, "ewc": 0.27},
    "cnn": {"kfc": 0.75, "ewc": 0.35},
}


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
        f"Config `{cfg.path or cfg.name}`; records in `{cfg.results_dir}`. {cfg.description}".strip(),
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
        lines.append(
            f"- Ranker `{r.name}` ({r.kind}): model {dict(r.model)}, training {dict(r.train)}, "
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
            paper = PAPER_FORGETTING_REDUCTION.get(r.kind, {}).get(m)
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


def _front(v: _View) -> list[str]:
    """Mean test accuracies of old and new task per λ, over orderings and seeds."""
    res = v.res
    rows = []
    for r in v.rankers:
        for m in [m for m in res.config.tier2.methods if m != "none"]:
            acc: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
            for (rn, ru, _s, o, mm), search in res.tier2_search.items():
                if rn != r.name or ru != v.rule or mm != m:
                    continue
                for lam, rec in zip(search.lambdas, search.rows, strict=True):
                    acc[lam][0].append(rec["metrics"][o[0]]["test"])
                    acc[lam][1].append(rec["metrics"][o[1]]["test"])
            for lam in sorted(acc):
                a, b = acc[lam]
                rows.append(
                    [
                        r.name,
                        m,
                        _lam([lam]),
                        _fmt(mean_std(a)[0]),
                        _fmt(mean_std(b)[0]),
                        str(len(a)),
                    ]
                )
        nones = [
            (rec["metrics"][k[3][0]]["test"], rec["metrics"][k[3][1]]["test"])
            for k, rec in res.tier2.items()
            if k[0] == r.name and k[1] == v.rule and k[4] == "none"
        ]
        if nones:
            rows.append(
                [
                    r.name,
                    "none",
                    "–",
                    _fmt(mean_std([x[0] for x in nones])[0]),
                    _fmt(mean_std([x[1] for x in nones])[0]),
                    str(len(nones)),
                ]
            )
    return _table(
        ["ranker", "method", "λ", "old task (A) test acc.", "new task (B) test acc.", "runs"], rows
    )


def _layers(v: _View) -> list[str]:
    """Share of each layer group in Ω of the old task, per run method and curvature."""
    from kronlink.experiments.analysis import layer_group

    res = v.res
    rows = []
    for r in v.rankers:
        for run_method in res.config.tier2.methods:
            per_curv: dict[str, list[dict[str, float]]] = defaultdict(list)
            for key, rec in res.layers.items():
                if key[0] != r.name or key[1] != v.rule or key[4] != run_method:
                    continue
                for curv, parts in rec["omega"].items():
                    groups: dict[str, float] = defaultdict(float)
                    for module, value in parts.items():
                        groups[layer_group(module)] += value
                    per_curv[curv].append(groups)
            for curv in ("kfc", "ekfac", "ewc"):
                runs = per_curv.get(curv)
                if not runs:
                    continue
                totals = [sum(g.values()) for g in runs]
                names = sorted({n for g in runs for n in g})
                share = {
                    n: mean_std(
                        [g.get(n, 0.0) / t for g, t in zip(runs, totals, strict=True) if t > 0]
                    )[0]
                    for n in names
                }
                top = sorted(share.items(), key=lambda kv: -kv[1])
                text = ", ".join(f"{n} {100 * x:.0f}%" for n, x in top if x >= 0.005)
                rows.append(
                    [r.name, run_method, curv, _fmt(mean_std(totals)[0], 4), str(len(runs)), text]
                )
    lines = [
        "Ω of the old task (its predicted loss increase, without λ) at the weights each tier-2 "
        "run ended with, under each curvature, and the share of each layer group in it "
        "(mean over orderings and seeds).",
        "",
    ]
    return lines + _table(
        ["ranker", "run (method, chosen λ)", "Ω under", "Ω", "runs", "share by layer group"], rows
    )


def _early(v: _View) -> list[str]:
    res = v.res
    cfg = res.config
    a, b = cfg.early.ordering
    rows = []
    for r in v.rankers:
        for m in cfg.early.methods:
            recs = [
                rec
                for k, rec in res.early.items()
                if k[0] == r.name and k[1] == v.rule and k[3] == m
            ]
            seeds = [k[2] for k in res.early if k[0] == r.name and k[1] == v.rule and k[3] == m]
            if not recs:
                continue
            singles_a = [res.early_single[(r.name, v.rule, s)]["metrics"][a]["test"] for s in seeds]
            row = [
                r.name,
                m,
                _lam(rec["spec"]["lambdas"] for rec in recs) if recs[0]["spec"]["lambdas"] else "–",
            ]
            acc_a = [rec["metrics"][a]["test"] for rec in recs]
            row += [
                _pm(singles_a),
                _pm(acc_a),
                _pm(
                    [
                        d
                        for d in (perc_delta(x, y) for x, y in zip(acc_a, singles_a, strict=True))
                        if d is not None
                    ],
                    pct=True,
                ),
                _pm([rec["metrics"][b]["test"] for rec in recs]),
                str(recs[0]["metrics"][b]["n_test"]),
            ]
            rows.append(row)
    lines = [
        f"{_arrow((a, b))} on a {100 * cfg.early.fraction:g}% subsample of each split; the "
        f"tier-1 model of {a} is trained on the subsample too. lrc: γ = {cfg.early.lrc_gamma:.3f}; "
        f"replay: {cfg.early.replay_size} old queries kept, {cfg.early.replay_per_batch} a batch "
        "(needs old data: research only).",
        "",
    ]
    lines += _table(
        [
            "ranker",
            "method",
            "λ",
            f"{a} acc. before",
            f"{a} acc. after",
            f"{a} Perc. Δ",
            f"{b} acc.",
            f"{b} test queries",
        ],
        rows,
    )
    return lines


def _figure2(res: Results, img_rel: str | None) -> list[str]:
    fig = res.figure2
    if fig is None:
        return []
    layers = ", ".join(
        f"`{x['name']}` {tuple(x['shape'])} ({x['size']} parameters with bias)"
        for x in fig["layers"]
    )
    lines = [
        "### Figure 2: full Fisher of the last layers against its approximations",
        "",
        f"Toy CNN (character vocabulary, `{res.config.figure2}`), last layers {layers}; "
        f"{fig['n_queries']} train queries of {res.config.figure2.task}, training loss at the end "
        f"{_fmt(fig['final_loss'])}. Relative error `‖F_approx - F‖_F / ‖F‖_F`:",
        "",
    ]
    rows = [
        [
            "whole (incl. blocks between layers)",
            *(_fmt(fig["relative_error"][k]) for k in ("kfac", "ekfac", "diag")),
        ]
    ]
    for name, errs in fig["relative_error_blocks"].items():
        rows.append([f"`{name}` block", *(_fmt(errs[k]) for k in ("kfac", "ekfac", "diag"))])
    lines += _table(["matrix", "KFAC", "EKFAC", "diagonal"], rows)
    if img_rel:
        lines += ["", f"![Figure 2]({img_rel})"]
    return lines


def _wall(res: Results) -> list[str]:
    def every(table: dict, searches: dict) -> list[dict]:
        recs = {r["id"]: r for r in table.values()}
        recs.update({r["id"]: r for s in searches.values() for r in s.rows})
        return list(recs.values())

    rows = []
    for tier, recs in (
        ("tier1", every(res.tier1, {})),
        ("combined", every(res.combined, {})),
        ("tier2 (every grid run)", every(res.tier2, res.tier2_search)),
        ("tier3 (every grid run)", every(res.tier3, res.tier3_search)),
        ("early (every grid run)", every({**res.early, **res.early_single}, res.early_search)),
    ):
        if not recs:
            continue
        tr = sum(r["seconds"]["train"] for r in recs)
        ev = sum(r["seconds"]["eval"] for r in recs)
        rows.append([tier, str(len(recs)), f"{tr:.0f}", f"{ev:.0f}"])
    curv = sum(s["seconds"] for s in res.states.values())
    rows.append(["curvature states", str(len(res.states)), f"{curv:.0f}", "–"])
    if res.figure2:
        rows.append(["figure 2", "1", f"{res.figure2['seconds']:.0f}", "–"])
    return _table(["part", "runs", "training (or estimation) s", "evaluation s"], rows)


def render_report(res: Results, img_dir: Path | None = None, img_rel: str | None = None) -> str:
    """The markdown section for ``res`` (charts drawn into ``img_dir`` when given)."""
    v = _View(res)
    cfg = res.config
    charts: dict[str, str] = {}
    if img_dir is not None:
        from kronlink.experiments.charts import draw_all

        charts = draw_all(res, img_dir, img_rel or str(img_dir))
    lines = [f"## Experiments: `{cfg.name}`", ""]
    lines += _setup(res)
    if not res.complete:
        lines += [
            "",
            f"**Incomplete**: {len(res.missing)} run(s) of this config are not stored yet; tables show what is.",
        ]
    lines += ["", *_tier1(v), ""]
    if res.tier2:
        lines += ["### Tier 2: two tasks in every order (the paper's Table 3)", ""]
        lines += [
            "Test accuracy after training on B (A: the old task); Perc. Δ against the "
            "tier-1 model of the same task and seed; λ chosen on the dev splits by the "
            "paper's rule (docs/experiments.md).",
            "",
        ]
        lines += _seq_table(v, "tier2")
        lines += ["#### Forgetting reduction (tier 2)", "", *_reduction(v, "tier2"), ""]
        lines += ["#### The λ front (tier 2): every grid run, mean over orderings and seeds", ""]
        lines += [*_front(v), ""]
        lines += ["#### Grid λ (old dev data) against the data-free λ", "", *_data_free(v), ""]
        if res.layers:
            lines += ["#### Which layers the penalty weighs (tier 2)", "", *_layers(v), ""]
        for key in ("percdelta", "front"):
            for r in v.rankers:
                if f"{key}-{r.name}" in charts:
                    lines += [f"![{key} {r.name}]({charts[f'{key}-{r.name}']})", ""]
    if res.tier3:
        lines += ["### Tier 3: three tasks in every order (the paper's Table 4)", ""]
        lines += _seq_table(v, "tier3")
        lines += ["#### Forgetting reduction (tier 3)", "", *_reduction(v, "tier3"), ""]
        for r in v.rankers:
            if f"matrix-{r.name}" in charts:
                lines += [f"![accuracy matrix {r.name}]({charts[f'matrix-{r.name}']})", ""]
    if res.early:
        lines += ["### Early comparison (the paper's Table 1)", "", *_early(v), ""]
    fig = _figure2(res, charts.get("figure2"))
    if fig:
        lines += [*fig, ""]
    lines += ["### Wall time", "", *_wall(res), ""]
    return "\n".join(lines).rstrip() + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- kronlink-report:{name}:begin -->", f"<!-- kronlink-report:{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path`` (appended the first
    time); everything outside the markers is left as it was."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
