"""A calibrated probability that the top answer is right, and "no match" (issue 12, item 4).

The ranker's softmax is over a query's candidates only: it says how the
candidates compare, not whether the right concept is among them. End to end
(retrieval, then ranking) the gold is missing from the candidates for a
third or more of the queries, and the softmax's top probability is then
still as high as ever. So the probability that the top answer is right is
fitted on the dev split, with every dev query in it, including those whose
gold is not among its candidates (they count as wrong).

Features of a query's top answer, from its candidates' scores (the scores
answers are ordered by, :func:`kronlink.ranking.rank_scores`):

- ``log_p1``: the top candidate's log softmax probability;
- ``margin``: the top score minus the second's (``MARGIN_CAP`` when there is
  one candidate, and never above it).

Two calibrators, one chosen per version:

- ``temperature``: ``softmax(scores / T)`` of the top candidate, one
  parameter. T is fitted to the binary NLL of "top-1 is right", not to the
  usual multiclass NLL of the gold: the gold is often absent.
- ``platt``: logistic regression of "top-1 is right" on
  ``(log_p1, margin)`` with an intercept (Newton's method, a tiny L2 on the
  two slopes so separable data still converges), kept monotone: a slope
  fitted below 0 is fixed at 0 and the other refit. Why: dev holds no query
  whose mention is its concept's name (the task builders drop them), so the
  exact-name prior's large margins (kronlink.ranking) lie outside dev's
  range, and a negative margin slope, which weak models do fit on dev,
  extrapolated to an exact match "Essential (primary) hypertension" -> I10
  ranked first with softmax 0.90 and got confidence 0.06 (demo version 1).

:func:`fit_calibrator` chooses the one with the lower held-out binary NLL in
``folds``-fold cross-validation on dev (seeded), then refits it on all of
dev. ECE here is the equal-width kind (``bins`` bins over [0, 1], each
weighted by its share of queries), as in Guo et al. 2017.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FOLDS",
    "MARGIN_CAP",
    "Calibrator",
    "binary_nll",
    "calibratable",
    "expected_calibration_error",
    "fit_calibrator",
    "fit_logistic",
    "fit_temperature",
    "precision_coverage",
    "reliability",
    "top_features",
]

MARGIN_CAP = 20.0  # nats; a lone candidate, or a gap this large, says the same
_EPS = 1e-12
_LOG_T_RANGE = (-4.0, 4.0)  # T from e^-4 to e^4: beyond both ends the answer is 0/1 or flat


def _row(scores: Sequence[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores of one query must be a flat list, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers")
    return s


def top_features(scores: Sequence[float]) -> tuple[float, float]:
    """``(log_p1, margin)`` of one query's candidate scores (see the module docstring).

    A query with no candidates has no top answer: ``(-inf, 0.0)``."""
    s = _row(scores)
    if s.size == 0:
        return -math.inf, 0.0
    top = float(s.max())
    log_p1 = top - (top + math.log(float(np.exp(s - top).sum())))
    if s.size == 1:
        return log_p1, MARGIN_CAP
    second = float(np.partition(s, -2)[-2])
    return log_p1, min(top - second, MARGIN_CAP)


def _top_prob_at(s: np.ndarray, temperature: float) -> float:
    z = s / temperature
    top = z.max()
    return float(1.0 / np.exp(z - top).sum())


def binary_nll(p: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray) -> float:
    """Mean negative log-likelihood of ``correct`` under probabilities ``p``."""
    pa = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(correct, dtype=np.float64)
    if pa.shape != y.shape or pa.ndim != 1:
        raise ValueError(f"p and correct must be flat and of one length, got {pa.shape}, {y.shape}")
    if y.size == 0:
        raise ValueError("no queries to measure")
    return float(-(y * np.log(pa) + (1 - y) * np.log1p(-pa)).mean())


@dataclass(frozen=True)
class Calibrator:
    """P(top-1 right) from a query's candidate scores. ``kind``: ``identity``
    (the softmax's top probability), ``temperature`` (``params["t"]``) or
    ``platt`` (``params["a"]`` on log_p1, ``params["b"]`` on margin, ``params["c"]``)."""

    kind: str
    params: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # how it was chosen; not used to predict

    def __post_init__(self) -> None:
        need = {"identity": set(), "temperature": {"t"}, "platt": {"a", "b", "c"}}
        if self.kind not in need:
            raise ValueError(
                f"calibrator kind must be identity, temperature or platt, got {self.kind!r}"
            )
        missing = need[self.kind] - set(self.params)
        if missing:
            raise ValueError(f"{self.kind} calibrator needs params {sorted(missing)}")
        if self.kind == "temperature" and not self.params["t"] > 0:
            raise ValueError(f"temperature must be > 0, got {self.params['t']}")

    def top_probability(self, scores: Sequence[float]) -> float:
        """The calibrated probability that the highest-scored candidate is right."""
        s = _row(scores)
        if s.size == 0:
            return 0.0
        if self.kind == "identity":
            return _top_prob_at(s, 1.0)
        if self.kind == "temperature":
            return _top_prob_at(s, float(self.params["t"]))
        log_p1, margin = top_features(s)
        p = self.params
        return _sigmoid(p["a"] * log_p1 + p["b"] * margin + p["c"])

    def score_scale(self) -> float:
        """Raw score units per calibrated nat. A prior stated in calibrated
        nats (the exact-name margin) is this many times larger on the scores.

        In order: ``info["exact_margin_scale"]``, the scale the update job
        evaluated and calibrated the version at (the model's own dev
        temperature, kronlink.update), so serving ranks as the recorded
        metrics say; else the temperature that calibrates the top answer on
        dev (``t`` itself for temperature scaling, ``info["score_temperature"]``
        for a Platt fit); 1 for a record with neither, or the identity."""
        t = self.info.get("exact_margin_scale")
        if isinstance(t, int | float) and t > 0:
            return float(t)
        if self.kind == "temperature":
            return float(self.params["t"])
        t = self.info.get("score_temperature")
        return float(t) if isinstance(t, int | float) and t > 0 else 1.0

    def many(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        return np.array([self.top_probability(r) for r in rows], dtype=np.float64)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """From :meth:`as_dict`'s output (a version's ``metrics["calibration"]``)."""
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"a calibration record needs 'kind' and 'params', got {d!r}")
        params = {k: float(v) for k, v in dict(d.get("params", {})).items()}
        return cls(kind=str(d["kind"]), params=params, info=dict(d.get("info", {})))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def fit_temperature(rows: Sequence[Sequence[float]], correct: Sequence[bool]) -> float:
    """T minimising the binary NLL of ``correct`` under the top softmax probability
    at T: a grid over log T, then golden-section search around the best point."""
    srows = [_row(r) for r in rows]
    keep = [i for i, r in enumerate(srows) if r.size]
    srows = [srows[i] for i in keep]
    y = np.asarray(correct, dtype=np.float64)[keep]

    def loss(log_t: float) -> float:
        t = math.exp(log_t)
        return binary_nll([_top_prob_at(r, t) for r in srows], y)

    lo, hi = _LOG_T_RANGE
    grid = np.linspace(lo, hi, 41)
    values = [loss(g) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def fit_logistic(
    x: np.ndarray, y: Sequence[bool] | np.ndarray, l2: float = 1e-4, iters: int = 100
) -> np.ndarray:
    """Weights ``w`` (one per column of ``x``, then the intercept) minimising
    ``mean binary NLL + l2/2 * |w[:-1]|^2`` by Newton's method."""
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2:
        raise ValueError(f"x must be 2-D (queries, features), got shape {xa.shape}")
    n = xa.shape[0]
    ya = np.asarray(y, dtype=np.float64)
    if ya.shape != (n,):
        raise ValueError(f"y must have one value per row of x ({n}), got shape {ya.shape}")
    design = np.hstack([xa, np.ones((n, 1))])
    w = np.zeros(design.shape[1])
    reg = np.full(design.shape[1], l2)
    reg[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iters):
        z = design @ w
        p = 1.0 / (1.0 + np.exp(-z))
        grad = design.T @ (p - ya) / n + reg * w
        hess = (design.T * (p * (1 - p))) @ design / n + np.diag(reg) + 1e-10 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def _features(rows: Sequence[Sequence[float]]) -> np.ndarray:
    feats = [top_features(r) for r in rows]
    # a query without candidates: its log_p1 is -inf; the floor keeps the fit finite
    return np.array([[max(lp, -50.0), m] for lp, m in feats], dtype=np.float64)


def _fit(kind: str, rows: Sequence[Sequence[float]], correct: np.ndarray) -> Calibrator:
    if kind == "identity":
        return Calibrator("identity")
    if kind == "temperature":
        return Calibrator("temperature", {"t": fit_temperature(rows, correct)})
    x = _features(rows)
    keep = [0, 1]
    while True:  # monotone: a slope fitted below 0 is dropped (fixed at 0) and the rest refit
        w = fit_logistic(x[:, keep], correct) if keep else None
        if w is None or all(w[i] >= 0 for i in range(len(keep))):
            break
        keep = [k for i, k in enumerate(keep) if w[i] >= 0]
    slopes = dict.fromkeys((0, 1), 0.0)
    if w is None:  # no feature kept: the dev accuracy, as a constant
        y = np.asarray(correct, dtype=np.float64)
        c = math.log(max(y.mean(), _EPS) / max(1 - y.mean(), _EPS))
    else:
        slopes.update({k: float(w[i]) for i, k in enumerate(keep)})
        c = float(w[-1])
    return Calibrator("platt", {"a": slopes[0], "b": slopes[1], "c": c})


FOLDS = 5  # fit_calibrator's cross-validation folds


def calibratable(correct: Sequence[bool], folds: int = FOLDS) -> bool:
    """Whether :func:`fit_calibrator` can fit to these "top-1 right" flags:
    two queries a fold, and both right and wrong top answers among them."""
    return len(correct) >= 2 * folds and 0 < sum(map(bool, correct)) < len(correct)


def fit_calibrator(
    rows: Sequence[Sequence[float]],
    correct: Sequence[bool],
    *,
    folds: int = FOLDS,
    seed: int = 0,
    kinds: Sequence[str] = ("temperature", "platt"),
) -> Calibrator:
    """Choose among ``kinds`` by held-out binary NLL (``folds``-fold CV, seeded),
    refit the chosen one on all rows. ``info`` records every kind's CV NLL
    (and the identity's, for reference) and the dev counts."""
    y = np.asarray(correct, dtype=bool)
    n = len(rows)
    if n != y.size:
        raise ValueError(f"{n} score rows but {y.size} correct flags")
    if n < 2 * folds:
        raise ValueError(f"need at least {2 * folds} dev queries to calibrate, got {n}")
    if y.all() or not y.any():
        raise ValueError(
            "dev's top answers are all right or all wrong: nothing to calibrate against"
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    cv: dict[str, float] = {}
    for kind in ("identity", *kinds):
        held = np.empty(n)
        for part in parts:
            train = np.setdiff1d(order, part)
            cal = _fit(kind, [rows[i] for i in train], y[train])
            held[part] = cal.many([rows[i] for i in part])
        cv[kind] = binary_nll(held, y)
    best = min(kinds, key=lambda k: cv[k])
    chosen = _fit(best, rows, y)
    info = {
        "chosen_by": f"{folds}-fold held-out binary NLL on dev (seed {seed})",
        "cv_nll": {k: round(v, 6) for k, v in cv.items()},
        "n_dev": n,
        "dev_top1": round(float(y.mean()), 6),
        # whichever kind is chosen: the scores' scale (Calibrator.score_scale)
        "score_temperature": fit_temperature(rows, y),
    }
    return Calibrator(chosen.kind, chosen.params, info)


def expected_calibration_error(
    p: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, bins: int = 10
) -> float:
    """Equal-width ECE: sum over bins of (share of queries) * |accuracy - mean p|."""
    return sum(
        b["count"] * abs(b["accuracy"] - b["confidence"])
        for b in reliability(p, correct, bins)
        if b["count"]
    ) / max(len(np.asarray(p)), 1)


def reliability(
    p: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, bins: int = 10
) -> list[dict[str, float]]:
    """Per equal-width bin of [0, 1] (the last one closed): its bounds, the
    number of queries, their mean p ("confidence") and their accuracy."""
    pa = np.asarray(p, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if pa.shape != y.shape or pa.ndim != 1:
        raise ValueError("p and correct must be flat and of one length")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    idx = np.minimum((pa * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": k,
                "confidence": float(pa[sel].mean()) if k else 0.0,
                "accuracy": float(y[sel].mean()) if k else 0.0,
            }
        )
    return out


def precision_coverage(
    p: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    thresholds: Sequence[float],
) -> list[dict[str, float]]:
    """Per threshold τ: answer only where p >= τ (else "no match"). ``coverage``
    is the share answered, ``precision`` the share of those whose top-1 is right
    (1.0 when none is answered: nothing wrong was said)."""
    pa = np.asarray(p, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    out = []
    for t in thresholds:
        ans = pa >= t
        k = int(ans.sum())
        out.append(
            {
                "threshold": float(t),
                "coverage": k / max(pa.size, 1),
                "precision": float(y[ans].mean()) if k else 1.0,
                "answered": k,
            }
        )
    return out
