"""The Ω calibration: its statistics against scipy and the standard library on
fresh random inputs, its pairing of forecasts with measured forgetting on a
hand-built run store, its verdicts, and the stored record and docs table
regenerating from the run records."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kronlink.experiments import omega_calibration as oc
from kronlink.experiments.report import write_section

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(5, 200))
    # Small integer ranges force many ties on both sides.
    x = rng.integers(0, 1 + seed * 3, n).astype(float) + (rng.random(n) if seed % 2 else 0)
    y = x * rng.normal(1, 0.5) + rng.integers(0, 7, n)
    want = stats.spearmanr(x, y).statistic
    got = oc.spearman(x, y)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_spearman_undefined_and_bad_shapes() -> None:
    assert math.isnan(oc.spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(oc.spearman([1, 2], [2, 1]))
    assert oc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert oc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one length"):
        oc.spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", range(4))
def test_quartiles_match_the_standard_library(seed: int) -> None:
    values = np.random.default_rng(seed).standard_cauchy(int(7 + 13 * seed)).tolist()
    q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
    assert oc.quartiles(values) == pytest.approx((q25, q50, q75), rel=1e-12)


@pytest.mark.parametrize("rho_true", [0.0, 0.6])
def test_bootstrap_interval_matches_scipys_bootstrap(rho_true: float) -> None:
    rng = np.random.default_rng(7)
    n = 150
    x = rng.normal(size=n)
    y = rho_true * x + math.sqrt(1 - rho_true**2) * rng.normal(size=n)
    lo, hi = oc.bootstrap_spearman(x, y, n_boot=3000, seed=1)
    ref = stats.bootstrap(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=3000,
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(2),
    ).confidence_interval
    # Two independent Monte Carlo estimates of the same interval.
    assert lo == pytest.approx(ref.low, abs=0.04)
    assert hi == pytest.approx(ref.high, abs=0.04)
    assert lo < oc.spearman(x, y) < hi


def test_bootstrap_resamples_whole_clusters() -> None:
    """Duplicating every point into a cluster of two changes nothing about the
    spread when clusters are resampled, but narrows it when points are."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = 0.3 * x + rng.normal(size=60)
    xx, yy = np.repeat(x, 2), np.repeat(y, 2)
    clusters = [str(i) for i in np.repeat(np.arange(60), 2)]
    single = oc.bootstrap_spearman(x, y, seed=4)
    by_cluster = oc.bootstrap_spearman(xx, yy, clusters, seed=4)
    by_point = oc.bootstrap_spearman(xx, yy, seed=4)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_cluster) == pytest.approx(width(single), rel=0.15)
    assert width(by_point) < 0.85 * width(by_cluster)


def _pair(i: int, predicted: float, acc: float | None, run: str | None = None) -> oc.Pair:
    return oc.Pair("c", "cnn", "kfc", "split", run or f"r{i}", "t", predicted, acc, acc, None)


def test_fit_group_calibrated_when_forecast_tracks_the_drop() -> None:
    rng = np.random.default_rng(5)
    pred = rng.uniform(0.01, 0.2, 40)
    drop = 30 * pred * rng.uniform(0.8, 1.25, 40)  # 30 points per nat, ±25%
    fit = oc.fit_group(
        [_pair(i, p, d) for i, (p, d) in enumerate(zip(pred, drop, strict=True))], "test_acc"
    )
    assert fit is not None and fit["calibrated"], fit["why"]
    ratios = drop / pred
    assert fit["ratio"]["median"] == pytest.approx(float(np.median(ratios)))
    assert 24 < fit["ratio"]["q25"] < fit["ratio"]["median"] < fit["ratio"]["q75"] < 37.5
    assert fit["n"] == fit["runs"] == 40 and fit["rho_ci"][0] > 0.5
    assert fit["noise"] is None  # no pair has a sampling SE
    se = rng.uniform(0.5, 5, 40)
    noisy = [
        replace(_pair(i, p, d), test_acc_se=e)
        for i, (p, d, e) in enumerate(zip(pred, drop, se, strict=True))
    ]
    z = oc.fit_group(noisy, "test_acc")["noise"]
    assert z["within_2se"] == pytest.approx(float(np.mean(np.abs(drop) <= 2 * se)))
    assert z["median_se"] == pytest.approx(statistics.median(se))
    assert z["median_abs_change"] == pytest.approx(statistics.median(np.abs(drop)))


def test_fit_group_says_why_it_fails() -> None:
    rng = np.random.default_rng(6)
    pred = rng.uniform(0.01, 0.2, 30)
    noise = rng.normal(0, 3, 30)  # unrelated to the forecast, often negative
    fit = oc.fit_group(
        [_pair(i, p, d) for i, (p, d) in enumerate(zip(pred, noise, strict=True))], "test_acc"
    )
    assert fit is not None and not fit["calibrated"]
    assert "lower end" in fit["why"] and "lower quartile" in fit["why"]
    few = oc.fit_group([_pair(i, 0.1 * (i + 1), 3.0 * (i + 1)) for i in range(5)], "test_acc")
    assert few is not None and not few["calibrated"] and "n 5 < 20" in few["why"]
    # No pair has the measure: no row.
    assert oc.fit_group([_pair(0, 0.1, None)], "test_nll") is None


def _write(root: Path, rec: dict) -> None:
    path = root / "runs" / rec["kind"] / f"{rec['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec), encoding="utf-8")


def _store(root: Path) -> None:
    """An anchor run on task a, its state, and two runs trained on task b."""
    _write(
        root,
        {
            "id": "anchor",
            "kind": "tier1",
            "spec": {"ranker": {"kind": "cnn"}},
            "metrics": {
                "a": {"test": 0.50, "dev": 0.40, "test_nll": 1.00, "test_ranks": [1, 1, 2, 0]}
            },
            "predicted_forgetting": [],
        },
    )
    _write(root, {"id": "st", "kind": "state", "spec": {}, "task": "a", "model_run": "anchor"})
    for rid, method, omega, acc, nll, ranks in [
        ("r1", "kfc", 0.2, 0.45, 1.3, {"test_ranks": [1, 2, 2, 1]}),
        ("r2", "ewc", 0.1, 0.52, 0.9, {}),
    ]:
        _write(
            root,
            {
                "id": rid,
                "kind": "tier2",
                "spec": {"ranker": {"kind": "cnn"}, "method": method, "priors": ["st"]},
                "metrics": {
                    "a": {"test": acc, "dev": 0.30, "test_nll": nll, **ranks},
                    "b": {"test": 0.9},
                },
                "predicted_forgetting": [omega],
            },
        )


def test_collect_pairs_reads_anchor_and_run(tmp_path: Path) -> None:
    _store(tmp_path / "s")
    src = oc.Source("s", "s", 0.5, "expand", "stored Ω")
    pairs = oc.collect_pairs(src, tmp_path)
    assert [(p.run, p.method, p.task) for p in pairs] == [("r1", "kfc", "a"), ("r2", "ewc", "a")]
    r1, r2 = pairs
    assert r1.predicted == pytest.approx(0.1) and r2.predicted == pytest.approx(0.05)
    assert r1.test_acc == pytest.approx(5.0) and r2.test_acc == pytest.approx(-2.0)
    assert r1.dev_acc == pytest.approx(10.0)
    assert r1.test_nll == pytest.approx(0.3) and r2.test_nll == pytest.approx(-0.1)
    # Correct (rank 1) before 1,1,0,0 and after 1,0,0,1: changes 0,-1,0,1, whose
    # sample SD is sqrt(2/3); SE = SD / sqrt(4), in points. r2 stores no ranks.
    assert r1.test_acc_se == pytest.approx(math.sqrt(2 / 3) / 2 * 100)
    assert r2.test_acc_se is None
    # A prior whose state is missing is an error naming the run, not a silent skip.
    (tmp_path / "s" / "runs" / "state" / "st.json").unlink()
    with pytest.raises(ValueError, match=r"run r[12]'s prior st"):
        oc.collect_pairs(src, tmp_path)
    with pytest.raises(FileNotFoundError, match="no run records"):
        oc.collect_pairs(replace(src, path="nowhere"), tmp_path)


def test_describe_omega_follows_the_record() -> None:
    group = {
        "config": "decisive",
        "ranker": "transformer",
        "method": "kfc",
        "rule": "split",
        "measure": "test_acc",
        "unit": "points",
        "n": 51,
        "runs": 51,
        "rho": 0.27,
        "rho_ci": [-0.02, 0.54],
        "ratio": {"q25": 10.0, "median": 20.0, "q75": 30.0, "n": 51},
        "calibrated": False,
        "why": "ρ interval's lower end -0.02 ≤ 0.5",
    }
    record = {"groups": [group]}
    out = oc.describe_omega(record, "transformer", "kfc", 0.01)
    assert not out["calibrated"]
    assert out["why"].startswith("rank correlation 0.27 [-0.02, 0.54] over 51 decisive runs")
    assert "accuracy_drop_points" not in out
    held = {"groups": [{**group, "calibrated": True, "why": ""}]}
    out = oc.describe_omega(held, "transformer", "kfc", 0.01)
    assert out["calibrated"]
    assert out["accuracy_drop_points"] == pytest.approx({"about": 0.2, "low": 0.1, "high": 0.3})
    assert "no research runs of cnn" in oc.describe_omega(held, "cnn", "kfc", 0.01)["why"]
    assert oc.describe_omega(None, "cnn", "kfc")["why"] == "no calibration record"


def test_stored_record_regenerates_the_docs_table(tmp_path: Path) -> None:
    record = oc.load_record(REPO / oc.DEFAULT_RECORD)
    md = tmp_path / "curvature.md"
    md.write_text((REPO / "docs/curvature.md").read_text(encoding="utf-8"), encoding="utf-8")
    write_section(md, oc.SECTION, oc.render_table(record))
    assert md.read_text(encoding="utf-8") == (REPO / "docs/curvature.md").read_text(
        encoding="utf-8"
    ), "docs/curvature.md is stale: run `kronlink omega-calibration --from-record`"
    # Every group of the table is in the record and the other way round.
    rows = re.findall(r"^\| (\w+) \| (\w+) \| ([\w-]+) \| (\w+) \| (\w+) \|", md.read_text(), re.M)
    keys = {
        (g["config"], g["ranker"], g["method"], g["rule"], g["measure"]) for g in record["groups"]
    }
    assert set(rows) == keys and len(rows) == len(keys)  # the header has no match


def test_stored_record_refits_from_the_run_records() -> None:
    """The fit in results/ is what the run records give now (catches a record
    left behind after the runs or the fitting code changed)."""
    stored = oc.load_record(REPO / oc.DEFAULT_RECORD)
    fresh = oc.calibrate(repo=REPO)
    stale = "results/curvature/omega_calibration.json is stale: run `kronlink omega-calibration`"
    assert fresh["pairs"] == stored["pairs"], stale
    assert json.loads(json.dumps(fresh["groups"])) == stored["groups"], stale
    assert len(stored["pairs"]) > 300


def test_cli_rebuilds_the_section_from_the_record(tmp_path: Path, capsys) -> None:
    from kronlink.cli import main

    md = tmp_path / "doc.md"
    md.write_text("# Kept\n", encoding="utf-8")
    record = REPO / oc.DEFAULT_RECORD
    assert (
        main(["omega-calibration", "--from-record", "--record", str(record), "--md", str(md)]) == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = oc.load_record(record)
    assert out["groups"] == len(stored["groups"]) and out["pairs"] == len(stored["pairs"])
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Kept\n") and oc.render_table(stored).strip() in text
