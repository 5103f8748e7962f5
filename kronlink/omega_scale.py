"""How predicted forgetting (``½ Ω``) may be read, from the stored calibration
record (``kronlink omega-calibration`` writes it; the fit and its rule are in
``kronlink/experiments/omega_calibration.py``).

Where the record's test-accuracy fit holds for a model's ranker and training
method under the rule ``predicted_forgetting`` uses now, ½Ω converts to an
expected accuracy drop of the old task, with the fit's quartiles as its
range. Everywhere else it stays a relative risk score, and the reading says
why (the rank correlation, the number of runs, the failed criterion). This
module is light (json only) so the service and the API can import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "CURRENT_RULE",
    "DEFAULT_PATH",
    "FORMAT",
    "describe_omega",
    "load_calibration",
    "omega_reading",
    "stored_calibration",
]

FORMAT = 1
# The rule ``predicted_forgetting`` uses now for a prior with KFAC factors
# (kronlink.penalties: PenaltyMethod.KFC, the split rule with exact blocks).
CURRENT_RULE = "split"
# The repository's record; the image copies it to the same place under /app.
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "results/curvature/omega_calibration.json"


def load_calibration(path: str | Path) -> dict[str, Any]:
    """The record at ``path``; a record of another format is an error."""
    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    if rec.get("format") != FORMAT:
        raise ValueError(
            f"{path}: calibration record format {rec.get('format')!r}, want {FORMAT}; "
            "rewrite it with `kronlink omega-calibration`"
        )
    return rec


@lru_cache(maxsize=4)
def stored_calibration(path: str | None = None) -> Mapping[str, Any] | None:
    """The record the service reads (cached); None when there is none, so a
    deployment without it shows Ω as an uncalibrated score, never as units."""
    try:
        return load_calibration(path or DEFAULT_PATH)
    except (OSError, ValueError):
        return None


def _f(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


def describe_omega(
    record: Mapping[str, Any] | None,
    ranker: str | None,
    method: str | None,
    value: float | None = None,
    *,
    rule: str = CURRENT_RULE,
) -> dict[str, Any]:
    """How to show a forecast of ``ranker`` trained by ``method`` under
    ``rule``: ``calibrated`` with an accuracy-drop range where the record's
    test-accuracy fit holds, else a relative risk score, ``why`` (the fit in
    a few words) and ``failed`` (the criteria it missed).

    Among the configs that ran this (ranker, method, rule) the one with the
    most pairs decides. An unknown ranker (None) matches every ranker, and
    then any uncalibrated fit wins: units are shown only when all agree."""
    out: dict[str, Any] = {"calibrated": False, "ranker": ranker, "method": method, "rule": rule}
    if record is None:
        return {**out, "why": "no calibration record"}
    fits = [
        g
        for g in record["groups"]
        if g["measure"] == "test_acc"
        and g["rule"] == rule
        and g["method"] == method
        and (ranker is None or g["ranker"] == ranker)
    ]
    if not fits:
        return {
            **out,
            "why": f"no research runs of {ranker or 'any ranker'} trained with "
            f"{method or 'this method'} under the {rule} rule",
        }
    g = min(fits, key=lambda f: (f["calibrated"], -f["n"], f["config"]))
    r = g["ratio"]
    basis = {"config": g["config"], "n": g["n"], "rho": g["rho"], "rho_ci": g["rho_ci"], "ratio": r}
    if not g["calibrated"]:
        return {
            **out,
            "basis": basis,
            "why": f"rank correlation {_f(g['rho'])} [{_f(g['rho_ci'][0])}, "
            f"{_f(g['rho_ci'][1])}] over {g['n']} {g['config']} runs",
            "failed": g["why"],
        }
    out = {**out, "calibrated": True, "basis": basis, "why": ""}
    if value is not None:
        out["accuracy_drop_points"] = {
            "about": r["median"] * value,
            "low": r["q25"] * value,
            "high": r["q75"] * value,
        }
    return out


def omega_reading(
    ranker: str | None,
    method: str | None,
    forecasts: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the API and the dashboard say about a version's forecasts: the
    verdict, a one-line ``label``, and per prior task the expected accuracy
    drop in points where calibrated (an empty mapping otherwise)."""
    rec = record if record is not None else stored_calibration()
    reading = describe_omega(rec, ranker, method)
    if reading["calibrated"]:
        b = reading["basis"]
        label = (
            f"expected accuracy drop (calibrated: rank correlation {_f(b['rho'])} over "
            f"{b['n']} {b['config']} runs)"
        )
    else:
        label = f"relative risk score (uncalibrated: {reading['why']})"
    drops = {}
    for task, value in (forecasts or {}).items():
        if reading["calibrated"] and isinstance(value, int | float) and math.isfinite(value):
            drops[task] = describe_omega(rec, ranker, method, float(value))["accuracy_drop_points"]
    return {**reading, "label": label, "accuracy_drop_points": drops}
