"""PNG charts of the report (matplotlib, Agg backend, imported lazily):

- ``percdelta-<ranker>``: Perc. Δ of the old and the new task by tier-2
  ordering and method;
- ``front-<ranker>``: old- against new-task test accuracy of every grid run;
- ``matrix-<ranker>``: tier 3's tasks x stages accuracy matrix per ordering
  and method;
- ``figure2``: the full, KFAC, EKFAC and diagonal Fisher of the toy's last layers.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from kronlink.experiments.metrics import mean_std, perc_delta
from kronlink.experiments.runner import Results

__all__ = ["draw_all"]

_COLORS = {
    "none": "#888888",
    "l2": "#8c564b",
    "ewc": "#1f77b4",
    "kfc": "#d62728",
    "ekfac": "#ff7f0e",
    "kfc-expand": "#e377c2",
    "ekfac-expand": "#bcbd22",
    "lrc": "#2ca02c",
    "replay": "#9467bd",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file, so an unchanged chart is byte-identical.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.clf()


def _single(res: Results, ranker: str, rule: str, seed: int, task: str) -> float | None:
    rec = res.tier1.get((ranker, rule, seed, task))
    return rec["metrics"][task]["test"] if rec else None


def _percdelta(res: Results, ranker: str, rule: str, path: Path) -> bool:
    plt = _plt()
    cells: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for (rn, ru, s, o, m), rec in res.tier2.items():
        if rn != ranker or ru != rule:
            continue
        da = perc_delta(rec["metrics"][o[0]]["test"], _single(res, rn, ru, s, o[0]) or 0.0)
        db = perc_delta(rec["metrics"][o[1]]["test"], _single(res, rn, ru, s, o[1]) or 0.0)
        if da is not None and db is not None:
            cells[(o, m)].append((da, db))
    if not cells:
        return False
    orderings = sorted({o for o, _m in cells})
    methods = [m for m in res.config.tier2.methods if any(mm == m for _o, mm in cells)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=False)
    width = 0.8 / len(methods)
    x = np.arange(len(orderings))
    for panel, (ax, title) in enumerate(
        zip(axes, ("old task A (forgetting)", "new task B"), strict=True)
    ):
        for j, m in enumerate(methods):
            vals = [cells.get((o, m), []) for o in orderings]
            means = [100 * mean_std([v[panel] for v in vs])[0] if vs else np.nan for vs in vals]
            sds = [100 * mean_std([v[panel] for v in vs])[1] if vs else 0 for vs in vals]
            ax.bar(x + j * width, means, width, yerr=sds, label=m, color=_COLORS.get(m))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x + width * (len(methods) - 1) / 2)
        ax.set_xticklabels(["→".join(o) for o in orderings], rotation=20, fontsize=8)
        ax.set_ylabel("Perc. Δ vs tier-1 model (%)")
        ax.set_title(f"{ranker}, tier 2: {title}")
    axes[0].legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def _front(res: Results, ranker: str, rule: str, path: Path) -> bool:
    plt = _plt()
    pts: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for (rn, ru, _s, o, m), search in res.tier2_search.items():
        if rn != ranker or ru != rule:
            continue
        for lam, rec in zip(search.lambdas, search.rows, strict=True):
            pts[m].append((lam[0], rec["metrics"][o[0]]["test"], rec["metrics"][o[1]]["test"]))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, vals in pts.items():
        by_lam: dict[float, list] = defaultdict(list)
        for lam, a, b in vals:
            by_lam[lam].append((a, b))
        lams = sorted(by_lam)
        xs = [np.mean([b for _a, b in by_lam[v]]) for v in lams]
        ys = [np.mean([a for a, _b in by_lam[v]]) for v in lams]
        ax.plot(xs, ys, "-o", color=_COLORS.get(m), label=m)
        for v, xx, yy in zip(lams, xs, ys, strict=True):
            ax.annotate(f"{v:g}", (xx, yy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    nones = [
        (rec["metrics"][k[3][1]]["test"], rec["metrics"][k[3][0]]["test"])
        for k, rec in res.tier2.items()
        if k[0] == ranker and k[1] == rule and k[4] == "none"
    ]
    if nones:
        ax.plot(*np.mean(nones, axis=0), "s", color=_COLORS["none"], label="none", ms=9)
    ax.set_xlabel("new task B test accuracy (mean over orderings)")
    ax.set_ylabel("old task A test accuracy")
    ax.set_title(f"{ranker}, tier 2: the λ front")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def _matrix(res: Results, ranker: str, rule: str, path: Path) -> bool:
    """Rows: the ordering's tasks; columns: after stage 1, 2, 3 (seed mean)."""
    plt = _plt()
    keys = sorted({(k[3], k[4]) for k in res.tier3 if k[0] == ranker and k[1] == rule})
    if not keys:
        return False
    orderings = sorted({o for o, _m in keys})
    methods = [m for m in res.config.tier3.methods if any(mm == m for _o, mm in keys)]
    fig, axes = plt.subplots(
        len(orderings),
        len(methods),
        figsize=(2.6 * len(methods), 2.4 * len(orderings)),
        squeeze=False,
    )
    for i, o in enumerate(orderings):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            cell: dict[tuple[int, int], list[float]] = defaultdict(list)
            for (rn, ru, s, oo, mm), rec3 in res.tier3.items():
                if (rn, ru, oo, mm) != (ranker, rule, o, m):
                    continue
                rec2 = res.tier2.get((rn, ru, s, o[:2], m))
                rec1 = res.tier1.get((rn, ru, s, o[0]))
                for col, rec in enumerate((rec1, rec2, rec3)):
                    if rec is not None:
                        for row, task in enumerate(o[: col + 1]):
                            cell[(row, col)].append(rec["metrics"][task]["test"])
            mat = np.full((3, 3), np.nan)
            for (row, col), vals in cell.items():
                mat[row, col] = float(np.mean(vals))  # mean over seeds
            ax.imshow(mat, vmin=0, vmax=max(0.05, np.nanmax(mat)), cmap="viridis")
            for r in range(3):
                for c in range(3):
                    if not np.isnan(mat[r, c]):
                        ax.text(
                            c,
                            r,
                            f"{mat[r, c]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white",
                        )
            ax.set_xticks(range(3))
            ax.set_xticklabels([f"after {t}" for t in o], fontsize=6, rotation=25, ha="right")
            ax.set_yticks(range(3))
            ax.set_yticklabels(o, fontsize=6)
            if i == 0:
                ax.set_title(m, fontsize=9)
    fig.suptitle(f"{ranker}, tier 3: test accuracy of each task after each stage", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)
    plt.close(fig)
    return True


def _figure2(res: Results, path: Path) -> bool:
    if not res.figure2:
        return False
    from safetensors.torch import load_file

    plt = _plt()
    mats = {k: v.numpy() for k, v in load_file(res.figure2["matrices"]).items()}
    errs = res.figure2["relative_error"]
    keys = ("full", "kfac", "ekfac", "diag")
    names = {"full": "full Fisher", "kfac": "KFAC", "ekfac": "EKFAC", "diag": "diagonal"}

    def scale(m: np.ndarray) -> float:
        return float(np.quantile(np.abs(m), 0.99)) or float(np.abs(m).max()) or 1.0

    shared = scale(mats["full"])
    fig, axes = plt.subplots(2, 4, figsize=(15, 8))
    # Row 1: one colour scale (the full Fisher's), so sizes compare; row 2:
    # each matrix on its own scale, so patterns compare.
    for row, own in enumerate((False, True)):
        for ax, key in zip(axes[row], keys, strict=True):
            vmax = scale(mats[key]) if own else shared
            im = ax.imshow(mats[key], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            title = names[key]
            if key != "full" and not own:
                title += f"\nrelative error {errs[key]:.3g}"
            if own:
                title += f"\nown scale ±{vmax:.2g}"
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if not own:
            fig.colorbar(im, ax=axes[row], shrink=0.8, label=f"shared scale ±{shared:.2g}")
    fig.suptitle(
        "Fisher of the toy CNN's last two layers (10x10 and 10x1 with biases, 121 parameters)",
        fontsize=10,
    )
    _save(fig, path)
    plt.close(fig)
    return True


def draw_all(res: Results, img_dir: Path, img_rel: str) -> dict[str, str]:
    """Draw every chart the results allow; returns name -> path for the markdown."""
    out: dict[str, str] = {}
    name = res.config.name
    rule = res.config.tasks.split_rules[0]
    for r in res.config.rankers:
        for key, fn in (("percdelta", _percdelta), ("front", _front), ("matrix", _matrix)):
            file = f"{name}-{key}-{r.name}.png"
            if fn(res, r.name, rule, img_dir / file):
                out[f"{key}-{r.name}"] = f"{img_rel.rstrip('/')}/{file}"
    if _figure2(res, img_dir / f"{name}-figure2.png"):
        out["figure2"] = f"{img_rel.rstrip('/')}/{name}-figure2.png"
    return out
