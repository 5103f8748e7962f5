"""How the dashboard shows Ω (predicted forgetting): one place, so the scale it
is shown on can change with its calibration.

Ω is the curvature's data-free, second-order forecast of a prior task's mean
loss increase, ``½ Δᵀ F Δ`` in nats per query (``predicted_forgetting``; the
penalty itself has no ½, docs/curvature.md). Until research runs calibrate it
against measured forgetting it has no units an operator can read, so it is
shown as a relative risk score: larger means more forgetting is likely.
"""

from __future__ import annotations

__all__ = ["OMEGA_EXPLAIN", "OMEGA_LABEL", "fmt_omega"]

OMEGA_LABEL = "relative risk score (uncalibrated)"
OMEGA_EXPLAIN = (
    "Ω, predicted forgetting: a data-free estimate of how much a prior task's loss "
    "rose; larger means more forgetting is likely, but it is not yet calibrated to "
    "an accuracy drop, so compare it between versions, not against a threshold."
)


def fmt_omega(value: float) -> str:
    """Ω as text, with the precision its size deserves."""
    return f"{value:.2g}" if value < 0.01 else f"{value:.3g}"
