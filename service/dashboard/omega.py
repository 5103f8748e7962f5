"""How the dashboard shows Ω (predicted forgetting): one place, so the scale it
is shown on follows its calibration.

Ω is the curvature's data-free, second-order forecast of a prior task's mean
loss increase, ``½ Δᵀ F Δ`` in nats per query (``predicted_forgetting``; the
penalty itself has no ½, docs/curvature.md). Whether it may be read as an
accuracy drop is decided per ranker and training method by the stored
calibration record (``kronlink.omega_scale``): where the fit holds, each cell
shows the expected drop in points with its range; everywhere else Ω is a
relative risk score, and the label says why (the rank correlation and the
number of research runs it rests on).
"""

from __future__ import annotations

from typing import Any

from kronlink.omega_scale import describe_omega, omega_reading, stored_calibration

__all__ = ["fmt_omega", "omega_drop", "omega_scale"]

_EXPLAIN_UNCALIBRATED = (
    "Ω, predicted forgetting: a data-free estimate of how much a prior task's loss "
    "rose; larger means more forgetting is likely, but against the research runs it "
    "does not predict an accuracy drop well enough to be read in points ({why}; "
    "docs/curvature.md, Ω calibration), so compare it between versions, not against "
    "a threshold."
)
_EXPLAIN_CALIBRATED = (
    "Ω, predicted forgetting: a data-free estimate of how much a prior task's loss "
    "rose, read as the prior task's expected test-accuracy drop: {ratio:.3g} points per "
    "unit of Ω (quartiles {q25:.3g} to {q75:.3g}) over {n} {config} runs "
    "(docs/curvature.md, Ω calibration)."
)


def fmt_omega(value: float) -> str:
    """Ω as text, with the precision its size deserves."""
    return f"{value:.2g}" if value < 0.01 else f"{value:.3g}"


def omega_scale(version: Any | None) -> dict[str, Any]:
    """The label and explanation for the Ω of ``version`` (a VersionRow: its
    ranker and method; None for an empty lineage)."""
    ranker = getattr(version, "ranker", None)
    method = getattr(version, "method", None)
    reading = omega_reading(ranker, method)
    if reading["calibrated"]:
        b = reading["basis"]
        r = b["ratio"]
        explain = _EXPLAIN_CALIBRATED.format(
            ratio=r["median"], q25=r["q25"], q75=r["q75"], n=b["n"], config=b["config"]
        )
    else:
        # The label already names the fit; the explanation adds what it missed.
        why = f"the fit missed: {reading['failed']}" if reading.get("failed") else reading["why"]
        explain = _EXPLAIN_UNCALIBRATED.format(why=why)
    return {**reading, "explain": explain}


def omega_drop(value: float | None, version: Any | None) -> dict[str, float] | None:
    """The expected accuracy drop (points: about, low, high) for Ω ``value`` at
    ``version``, or None where the calibration does not hold."""
    if value is None or version is None:
        return None
    out = describe_omega(stored_calibration(), version.ranker, version.method, value)
    return out.get("accuracy_drop_points")
