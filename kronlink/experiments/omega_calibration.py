"""How well ``predicted_forgetting`` (``½ Ω``, the curvature's forecast of an
old task's loss rise) tracks the forgetting the research runs measured.

Every run record that trained with priors stores ``predicted_forgetting`` at
its final weights, one value per prior. The prior's state record names the
run whose weights anchor it (``model_run``); that run's record holds the old
task's metrics at the anchor. So each (run, prior) gives one pair: the
forecast, and the measured change of the old task between the anchor and the
run: test accuracy drop (points), dev accuracy drop (points) and, where the
records store it (``test_nll``, the decisive runs only), the test NLL rise
(nats per query). Weights and curvature states are not in the repository
(only the records are), so Ω cannot be recomputed under another rule: each
source is read under the rule its code used, stated in :data:`SOURCES`.

The decision rule, fixed before the table was first computed (the issue had
already reported ρ = 0.27 over the 108 CPU tier-2 runs): a group (config,
ranker, training method, curvature rule) is *calibrated* for a measure when

- it has at least :data:`MIN_N` pairs;
- the lower end of the 95% bootstrap interval of Spearman's ρ between the
  forecast and the measured value is above :data:`RHO_LOWER` (resampling
  runs, so a run's two priors stay together);
- the per-pair ratio measured / forecast has a positive lower quartile and
  an upper quartile at most :data:`IQR_FACTOR` times it.

Only there may Ω be shown as an accuracy drop ("about x points, between a
and b": the ratio's median and quartiles times the forecast).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kronlink.omega_scale import CURRENT_RULE, FORMAT, describe_omega, load_calibration

__all__ = [
    "CURRENT_RULE",
    "IQR_FACTOR",
    "MIN_N",
    "RHO_LOWER",
    "SOURCES",
    "Pair",
    "Source",
    "bootstrap_spearman",
    "calibrate",
    "collect_pairs",
    "describe_omega",
    "fit_group",
    "fit_pairs",
    "load_record",
    "pairs_of",
    "quartiles",
    "render_table",
    "spearman",
    "write_calibration",
]

MIN_N = 20
RHO_LOWER = 0.5
IQR_FACTOR = 2.0
BOOTSTRAP = 2000
CI = 0.95
SEED = 0
MEASURES = {
    "test_acc": "points",  # old task's test top-1 accuracy drop, x100
    "dev_acc": "points",
    "test_nll": "nats",  # old task's test NLL rise per query
}
SECTION = "omega-calibration"
DEFAULT_RECORD = Path("results/curvature/omega_calibration.json")  # relative to the repository


@dataclass(frozen=True)
class Source:
    """One stored experiment. ``factor`` turns its stored
    ``predicted_forgetting`` into ``½ Ω``; ``rule`` is the KFAC rule its code
    used for that forecast."""

    name: str
    path: str  # the RunStore root, relative to the repository
    factor: float
    rule: str
    why: str


# The CPU experiments were run on 2026-11-25, before commit 66bc48c
# (2026-11-30) made predicted_forgetting return ½Ω and added the split rule:
# they stored Ω under the expand rule. The decisive runs were made after the
# issue-13 merge (their configs train kfc-expand beside kfc), so they store ½Ω
# under the split rule.
_OLD = "stored Ω (before commit 66bc48c), expand rule: halved"
_NEW = "stored ½Ω (after the issue-13 merge), split rule with exact blocks"
SOURCES: tuple[Source, ...] = (
    Source("cpu_small", "results/cpu_small", 0.5, "expand", _OLD),
    Source("cpu_probe", "results/cpu_probe", 0.5, "expand", _OLD),
    Source("cpu_transformer", "results/cpu_transformer", 0.5, "expand", _OLD),
    Source("decisive", "results/decisive/results", 1.0, "split", _NEW),
)


@dataclass(frozen=True)
class Pair:
    """One (run, prior): the forecast and what was measured."""

    config: str
    ranker: str
    method: str
    rule: str
    run: str
    task: str
    predicted: float  # ½ Ω, nats per query
    test_acc: float | None  # drop, points
    dev_acc: float | None  # drop, points
    test_nll: float | None  # rise, nats
    # Sampling noise of test_acc: the standard error of the paired per-query
    # change (points), where both records store the test queries' ranks.
    test_acc_se: float | None = None
    n_test: int | None = None  # old task's split sizes, after the update
    n_dev: int | None = None


# -- statistics -----------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank (as Spearman's ρ needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # A run of k equal values ending at rank c holds ranks c-k+1..c: mean c-(k-1)/2.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    return mean_rank[inverse].astype(float)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the (tie-averaged) ranks; NaN
    when either side is constant or there are fewer than 3 points."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-d sequences of one length, got {a.shape}, {b.shape}"
        )
    if len(a) < 3:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else math.nan


def bootstrap_spearman(
    x: Sequence[float],
    y: Sequence[float],
    clusters: Sequence[str] | None = None,
    *,
    n_boot: int = BOOTSTRAP,
    ci: float = CI,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile interval of ρ over resamples of ``clusters`` (each point its
    own cluster when None); resamples where ρ is undefined are dropped."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keys = list(range(len(a))) if clusters is None else list(clusters)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    members = [np.asarray(g, dtype=int) for g in groups.values()]
    singletons = all(len(g) == 1 for g in members)
    flat = np.concatenate(members) if members else np.zeros(0, dtype=int)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = flat[pick] if singletons else np.concatenate([members[g] for g in pick])
        r = spearman(a[idx], b[idx])
        if not math.isnan(r):
            rhos.append(r)
    if not rhos:
        return math.nan, math.nan
    tail = (1 - ci) / 2 * 100
    lo, hi = np.percentile(rhos, [tail, 100 - tail])
    return float(lo), float(hi)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75), linear interpolation (numpy's default)."""
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def _num(x: float) -> float | None:
    """JSON has no NaN: an undefined statistic is stored as null."""
    return None if math.isnan(x) else float(x)


def fit_group(pairs: Sequence[Pair], measure: str) -> dict[str, Any] | None:
    """ρ with its interval, the ratio's quartiles and the verdict for one
    group and one measure; None when no pair has that measure."""
    rows = [p for p in pairs if getattr(p, measure) is not None]
    if not rows:
        return None
    pred = [p.predicted for p in rows]
    meas = [getattr(p, measure) for p in rows]
    rho = spearman(pred, meas)
    lo, hi = bootstrap_spearman(pred, meas, [p.run for p in rows])
    ratios = [m / p for p, m in zip(pred, meas, strict=True) if p > 0]
    q25, med, q75 = quartiles(ratios) if ratios else (math.nan,) * 3
    reasons: list[str] = []
    if len(rows) < MIN_N:
        reasons.append(f"n {len(rows)} < {MIN_N}")
    if not lo > RHO_LOWER:
        reasons.append(f"ρ interval's lower end {lo:.2f} ≤ {RHO_LOWER}")
    if not q25 > 0:
        reasons.append(f"ratio's lower quartile {q25:.3g} ≤ 0")
    elif not q75 <= IQR_FACTOR * q25:
        reasons.append(f"ratio's quartiles {q25:.3g}–{q75:.3g} span more than {IQR_FACTOR:g}x")
    noise = None
    if measure == "test_acc" and all(p.test_acc_se is not None for p in rows):
        # Is a run's measured change larger than its own sampling noise?
        change = np.abs(np.asarray(meas, dtype=float))
        se = np.asarray([p.test_acc_se for p in rows], dtype=float)
        noise = {
            "median_abs_change": float(np.median(change)),
            "median_se": float(np.median(se)),
            "within_2se": float(np.mean(change <= 2 * se)),
        }
    return {
        "measure": measure,
        "unit": MEASURES[measure],
        "n": len(rows),
        "runs": len({p.run for p in rows}),
        "rho": _num(rho),
        "rho_ci": [_num(lo), _num(hi)],
        "ratio": {"q25": _num(q25), "median": _num(med), "q75": _num(q75), "n": len(ratios)},
        "calibrated": not reasons,
        "why": "; ".join(reasons),
        "noise": noise,
    }


# -- records --------------------------------------------------------------------


def _load_runs(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((root / "runs").glob("*/*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        out[rec["id"]] = rec
    return out


def _drop(before: Mapping | None, after: Mapping | None, key: str, scale: float) -> float | None:
    if not before or not after or before.get(key) is None or after.get(key) is None:
        return None
    return (float(before[key]) - float(after[key])) * scale


def _paired_se(before: Mapping | None, after: Mapping | None) -> float | None:
    """Standard error (points) of the test-accuracy change, paired over the
    same test queries (1-based ranks, 0 when the gold is absent)."""
    a = (before or {}).get("test_ranks")
    b = (after or {}).get("test_ranks")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = (np.asarray(b) == 1).astype(float) - (np.asarray(a) == 1).astype(float)
    return float(d.std(ddof=1) / math.sqrt(len(d)) * 100.0)


def collect_pairs(source: Source, repo: Path = Path()) -> list[Pair]:
    """Every (run, prior) of ``source`` with a stored forecast."""
    root = repo / source.path
    if not (root / "runs").is_dir():
        raise FileNotFoundError(f"{root}/runs: no run records for source {source.name!r}")
    runs = _load_runs(root)
    pairs = []
    for rid, rec in runs.items():
        forecast = rec.get("predicted_forgetting") or []
        spec = rec.get("spec", {})
        priors = spec.get("priors") or []
        if not forecast or len(forecast) != len(priors):
            continue
        for value, sid in zip(forecast, priors, strict=True):
            state = runs.get(sid)
            anchor = runs.get(state["model_run"]) if state else None
            if state is None or anchor is None:
                raise ValueError(
                    f"{source.path}: run {rid}'s prior {sid} or its anchor run is not stored"
                )
            task = state["task"]
            before, after = anchor["metrics"].get(task), rec["metrics"].get(task)
            pairs.append(
                Pair(
                    config=source.name,
                    ranker=spec["ranker"]["kind"],
                    method=spec["method"],
                    rule=source.rule,
                    run=rid,
                    task=task,
                    predicted=float(value) * source.factor,
                    test_acc=_drop(before, after, "test", 100.0),
                    dev_acc=_drop(before, after, "dev", 100.0),
                    # a rise: after minus before
                    test_nll=-d
                    if (d := _drop(before, after, "test_nll", 1.0)) is not None
                    else None,
                    test_acc_se=_paired_se(before, after),
                    n_test=(after or {}).get("n_test"),
                    n_dev=(after or {}).get("n_dev"),
                )
            )
    return sorted(pairs, key=lambda p: (p.config, p.run, p.task))


def _groups(pairs: Iterable[Pair]) -> dict[tuple[str, str, str, str], list[Pair]]:
    out: dict[tuple[str, str, str, str], list[Pair]] = defaultdict(list)
    for p in pairs:
        out[(p.config, p.ranker, p.method, p.rule)].append(p)
        # Every method together: Ω is computed the same way whatever trained.
        out[(p.config, p.ranker, "all", p.rule)].append(p)
    return dict(sorted(out.items()))


def fit_pairs(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    rows = []
    for (config, ranker, method, rule), members in _groups(pairs).items():
        for measure in MEASURES:
            fit = fit_group(members, measure)
            if fit is not None:
                rows.append(
                    {"config": config, "ranker": ranker, "method": method, "rule": rule, **fit}
                )
    return rows


def calibrate(sources: Sequence[Source] = SOURCES, repo: Path = Path()) -> dict[str, Any]:
    """The whole record: criteria, sources, every pair and every group's fit."""
    pairs = [p for s in sources for p in collect_pairs(s, repo)]
    return {
        "format": FORMAT,
        "criteria": {
            "min_n": MIN_N,
            "rho_lower": RHO_LOWER,
            "iqr_factor": IQR_FACTOR,
            "bootstrap": BOOTSTRAP,
            "ci": CI,
            "seed": SEED,
            "resample": "runs",
        },
        "current_rule": CURRENT_RULE,
        "sources": [asdict(s) for s in sources],
        "pairs": [asdict(p) for p in pairs],
        "groups": fit_pairs(pairs),
    }


def load_record(path: Path = DEFAULT_RECORD) -> dict[str, Any]:
    return load_calibration(path)


def pairs_of(record: Mapping[str, Any]) -> list[Pair]:
    return [Pair(**p) for p in record["pairs"]]


# -- the table ------------------------------------------------------------------


def _f(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or math.isnan(x) else format(x, spec)


def _span(pairs: Sequence[Mapping[str, Any]], config: str, key: str) -> str:
    sizes = sorted({p[key] for p in pairs if p["config"] == config and p.get(key) is not None})
    if not sizes:
        return "–"
    return str(sizes[0]) if sizes[0] == sizes[-1] else f"{sizes[0]} to {sizes[-1]}"


def render_table(record: Mapping[str, Any]) -> str:
    """The docs/curvature.md section, from the record alone."""
    c = record["criteria"]
    lines = [
        "Generated by `kronlink omega-calibration` from "
        "`results/curvature/omega_calibration.json` (do not edit by hand).",
        "",
        f"Forecast: `predicted_forgetting` = ½Ω (nats per query). Measured: the old task "
        f"between the prior's anchor run and the run (accuracy drop in points, NLL rise in "
        f"nats; NLL is stored only by the decisive runs). ρ: Spearman's, with a "
        f"{c['ci']:.0%} bootstrap interval ({c['bootstrap']} resamples of runs). Ratio: "
        f"measured / forecast per pair, median [q25, q75]. Calibrated (✓) when n ≥ "
        f"{c['min_n']}, the interval's lower end > {c['rho_lower']} and q75 ≤ "
        f"{c['iqr_factor']:g}·q25 with q25 > 0.",
        "",
        "Old-task split sizes (queries): "
        + "; ".join(
            f"{cfg} test {_span(record['pairs'], cfg, 'n_test')}, "
            f"dev {_span(record['pairs'], cfg, 'n_dev')}"
            for cfg in dict.fromkeys(p["config"] for p in record["pairs"])
        )
        + ".",
        "",
        "| config | ranker | method | Ω rule | measure | n (runs) | ρ [95% CI] "
        "| ratio median [q25, q75] | calibrated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in record["groups"]:
        r = g["ratio"]
        unit = "points/nat" if g["unit"] == "points" else "nats/nat"
        verdict = "✓" if g["calibrated"] else f"no: {g['why']}"
        lines.append(
            f"| {g['config']} | {g['ranker']} | {g['method']} | {g['rule']} | {g['measure']} "
            f"| {g['n']} ({g['runs']}) | {_f(g['rho'])} [{_f(g['rho_ci'][0])}, "
            f"{_f(g['rho_ci'][1])}] | {_f(r['median'], '.3g')} [{_f(r['q25'], '.3g')}, "
            f"{_f(r['q75'], '.3g')}] {unit} | {verdict} |"
        )
    noisy = [g for g in record["groups"] if g.get("noise")]
    if noisy:
        lines += [
            "",
            "The measured test-accuracy change against its own sampling noise, where the "
            "records store the test queries' ranks (SE of the change paired over the same "
            "queries, points):",
            "",
            "| config | ranker | method | n | median abs. change | median SE | within 2 SE |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in noisy:
            z = g["noise"]
            lines.append(
                f"| {g['config']} | {g['ranker']} | {g['method']} | {g['n']} "
                f"| {z['median_abs_change']:.2f} | {z['median_se']:.2f} "
                f"| {z['within_2se']:.0%} |"
            )
    held = [g for g in record["groups"] if g["calibrated"]]
    lines += [
        "",
        f"Calibrated groups: {len(held)} of {len(record['groups'])}"
        + (
            ": "
            + ", ".join(f"{g['config']}/{g['ranker']}/{g['method']}/{g['measure']}" for g in held)
            if held
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


# -- writing --------------------------------------------------------------------


def write_calibration(
    record_path: Path = DEFAULT_RECORD,
    md_path: Path = Path("docs/curvature.md"),
    *,
    from_record: bool = False,
    repo: Path = Path(),
) -> dict[str, Any]:
    """Refit from the run records (or reread the stored record), store the
    record and put the table into ``md_path``'s section; returns the record."""
    from kronlink.experiments.report import write_section

    if from_record:
        record = load_record(record_path)
    else:
        record = calibrate(repo=repo)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    write_section(md_path, SECTION, render_table(record))
    return record
