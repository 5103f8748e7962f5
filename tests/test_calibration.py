"""kronlink.calibration against brute force and scipy, on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kronlink.calibration import (
    MARGIN_CAP,
    Calibrator,
    binary_nll,
    expected_calibration_error,
    fit_calibrator,
    fit_logistic,
    fit_temperature,
    precision_coverage,
    reliability,
    top_features,
)

optimize = pytest.importorskip("scipy.optimize")


def _rows(rng: np.random.Generator, n: int) -> list[list[float]]:
    return [list(rng.normal(0, 2, size=int(rng.integers(1, 12)))) for _ in range(n)]


def test_top_features_match_torch_log_softmax() -> None:
    rng = np.random.default_rng(1)
    for row in _rows(rng, 50):
        lp, margin = top_features(row)
        t = torch.tensor(row, dtype=torch.float64)
        assert lp == pytest.approx(float(torch.log_softmax(t, 0).max()), abs=1e-12)
        if len(row) == 1:
            assert margin == MARGIN_CAP
        else:
            s = sorted(row, reverse=True)
            assert margin == pytest.approx(min(s[0] - s[1], MARGIN_CAP), abs=1e-12)
    assert top_features([]) == (-math.inf, 0.0)


def test_ece_and_reliability_by_hand() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(997)
    p[:5] = [0.0, 1.0, 0.1, 0.2, 0.9999]  # the edges: 1.0 goes in the last bin
    y = rng.random(997) < p**1.5
    for bins in (1, 7, 10, 15):
        total = 0.0
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            members = [
                i for i in range(len(p)) if (lo <= p[i] < hi) or (b == bins - 1 and p[i] == 1.0)
            ]
            if members:
                acc = sum(y[i] for i in members) / len(members)
                conf = sum(p[i] for i in members) / len(members)
                total += len(members) / len(p) * abs(acc - conf)
                rel = reliability(p, y, bins)[b]
                assert rel["count"] == len(members)
                assert rel["accuracy"] == pytest.approx(acc)
                assert rel["confidence"] == pytest.approx(conf)
        assert expected_calibration_error(p, y, bins) == pytest.approx(total, abs=1e-12)
    # a perfectly calibrated constant has ECE 0; a confident wrong one has ECE 1
    assert expected_calibration_error([0.25] * 8, [1, 0, 0, 0] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([1.0] * 4, [0] * 4) == pytest.approx(1.0)


def test_logistic_matches_scipy_on_the_same_objective() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 2))
    y = rng.random(400) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 0.7 * x[:, 1] + 0.3)))
    l2 = 1e-3
    w = fit_logistic(x, y, l2=l2)

    def objective(v: np.ndarray) -> float:
        z = x @ v[:2] + v[2]
        nll = np.mean(np.logaddexp(0, z) - y * z)
        return float(nll + l2 / 2 * np.sum(v[:2] ** 2))

    ref = optimize.minimize(objective, np.zeros(3), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(w, ref.x, atol=1e-5)
    assert abs(w[0] - 1.5) < 0.5 and abs(w[1] + 0.7) < 0.5  # recovers the generating weights


def test_temperature_matches_scipy_bounded_search() -> None:
    rng = np.random.default_rng(4)
    rows = _rows(rng, 300)
    true_t = 2.5
    correct = [
        rng.random() < Calibrator("temperature", {"t": true_t}).top_probability(r) for r in rows
    ]
    t = fit_temperature(rows, correct)

    def loss(log_t: float) -> float:
        return binary_nll(Calibrator("temperature", {"t": math.exp(log_t)}).many(rows), correct)

    ref = optimize.minimize_scalar(loss, bounds=(-4, 4), method="bounded", options={"xatol": 1e-9})
    assert math.log(t) == pytest.approx(ref.x, abs=1e-4)
    assert loss(math.log(t)) <= ref.fun + 1e-9


def test_fit_calibrator_chooses_by_held_out_nll_and_calibrates_fresh_data() -> None:
    rng = np.random.default_rng(5)

    def sample(n: int) -> tuple[list[list[float]], list[bool]]:
        # the gold is absent for ~40% of queries: the softmax is over-confident
        rows = _rows(rng, n)
        truth = Calibrator("platt", {"a": 1.0, "b": 0.2, "c": -0.6})
        return rows, [bool(rng.random() < truth.top_probability(r)) for r in rows]

    rows, y = sample(3000)
    cal = fit_calibrator(rows, y)
    assert cal.kind == "platt"  # the data were made by a Platt model
    assert cal.info["cv_nll"]["platt"] < cal.info["cv_nll"]["identity"]
    assert cal.info["n_dev"] == 3000
    fresh_rows, fresh_y = sample(4000)
    raw = Calibrator("identity").many(fresh_rows)
    after = cal.many(fresh_rows)
    assert expected_calibration_error(after, fresh_y) < 0.03
    assert expected_calibration_error(raw, fresh_y) > 0.1
    # round trip through the version's JSON
    again = Calibrator.from_dict(cal.as_dict())
    assert again.top_probability(fresh_rows[0]) == cal.top_probability(fresh_rows[0])


def test_fit_calibrator_refuses_what_it_cannot_fit() -> None:
    rows = [[1.0, 0.0]] * 20
    with pytest.raises(ValueError, match="all right or all wrong"):
        fit_calibrator(rows, [True] * 20)
    with pytest.raises(ValueError, match="at least 10"):
        fit_calibrator(rows[:4], [True, False] * 2)
    with pytest.raises(ValueError, match="kind must be"):
        Calibrator("isotonic")
    with pytest.raises(ValueError, match="needs params"):
        Calibrator.from_dict({"kind": "platt", "params": {"a": 1}})


def test_precision_coverage_by_hand() -> None:
    rng = np.random.default_rng(6)
    p = rng.random(300)
    y = rng.random(300) < p
    taus = [0.0, 0.3, 0.5, 0.9, 1.01]
    for row, tau in zip(precision_coverage(p, y, taus), taus, strict=True):
        answered = [i for i in range(300) if p[i] >= tau]
        assert row["answered"] == len(answered)
        assert row["coverage"] == pytest.approx(len(answered) / 300)
        exp = sum(y[i] for i in answered) / len(answered) if answered else 1.0
        assert row["precision"] == pytest.approx(exp)


def test_platt_stays_monotone_when_dev_fits_a_negative_slope() -> None:
    """Data where a larger margin means a wrong answer: the unconstrained fit
    has a negative margin slope; the calibrator fixes it at 0 and refits the
    log_p1 slope alone, so a surer top answer never gets a lower confidence."""
    from kronlink.calibration import _features, _fit

    rng = np.random.default_rng(7)
    rows = _rows(rng, 2000)
    x = _features(rows)
    truth = 1 / (1 + np.exp(-(3.0 * x[:, 0] - 0.3 * x[:, 1] + 0.5)))
    y = rng.random(2000) < truth
    free = fit_logistic(x, y)
    assert free[1] < 0  # the unconstrained fit would penalise a large margin
    cal = _fit("platt", rows, y)
    assert cal.params["b"] == 0.0 and cal.params["a"] > 0
    alone = fit_logistic(x[:, :1], y)
    assert cal.params["a"] == pytest.approx(alone[0]) and cal.params["c"] == pytest.approx(alone[1])
    # both slopes negative: a constant, the dev accuracy
    flat = _fit("platt", rows, ~((x[:, 0] > -1) | (x[:, 1] > 2)))
    assert flat.params["a"] == flat.params["b"] == 0.0
    mean = float(np.mean(~((x[:, 0] > -1) | (x[:, 1] > 2))))
    assert flat.top_probability(rows[0]) == pytest.approx(mean)


def test_score_scale_is_the_temperature_whichever_kind_is_chosen() -> None:
    import numpy as np

    from kronlink.calibration import Calibrator, fit_calibrator, fit_temperature

    assert Calibrator("temperature", {"t": 3.5}).score_scale() == 3.5
    platt = {"a": 1.8, "b": 0.0, "c": -0.4}
    assert Calibrator("platt", platt, {"score_temperature": 2.5}).score_scale() == 2.5
    assert Calibrator("platt", platt).score_scale() == 1.0  # a record from before the field
    assert Calibrator("identity").score_scale() == 1.0
    # the scale the update job evaluated the version at wins over either fit
    # (kronlink.update: the model's own dev temperature, before any prior)
    both = {"score_temperature": 2.5, "exact_margin_scale": 4.0}
    assert Calibrator("platt", platt, both).score_scale() == 4.0
    assert Calibrator("temperature", {"t": 3.5}, both).score_scale() == 4.0
    # Fresh overconfident scores: the top answer is right about half the time
    # whatever its margin, so the fitted temperature is well above 1.
    rng = np.random.default_rng()
    rows = (rng.normal(size=(200, 5)) * 6).tolist()
    right = (rng.random(200) < 0.5).tolist()
    for kinds in (("temperature",), ("platt",)):
        cal = fit_calibrator(rows, right, kinds=kinds)
        assert cal.kind == kinds[0]
        assert cal.info["score_temperature"] == fit_temperature(rows, right) > 1.5
        assert cal.score_scale() == pytest.approx(fit_temperature(rows, right))


@pytest.mark.parametrize("n", [9, 10, 11, 40])
@pytest.mark.parametrize("kind", ["mixed", "all_right", "all_wrong"])
def test_calibratable_says_exactly_when_fit_calibrator_fits(n: int, kind: str) -> None:
    from kronlink.calibration import FOLDS, calibratable

    rng = np.random.default_rng(n)
    rows = [list(rng.normal(size=3)) for _ in range(n)]
    correct = {"mixed": [i % 3 == 0 for i in range(n)], "all_right": [True] * n}.get(
        kind, [False] * n
    )
    fits = True
    try:
        fit_calibrator(rows, correct)
    except ValueError:
        fits = False
    assert calibratable(correct) == fits
    assert fits == (kind == "mixed" and n >= 2 * FOLDS)
