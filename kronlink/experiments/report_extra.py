"""The report's secondary tables: the λ front, Ω by layer, the early
comparison, Figure 2 and wall time.
"""

from __future__ import annotations

from collections import defaultdict

from kronlink.experiments.metrics import mean_std, perc_delta
from kronlink.experiments.report_tables import _arrow, _fmt, _lam, _pm, _table, _View
from kronlink.experiments.runner import Results


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
