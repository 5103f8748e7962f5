"""Curvature of a ranker's loss: Kronecker-factored (KFAC), eigenvalue-
corrected (EKFAC) and diagonal Fisher, as value types that save to
safetensors. The formulas are in ``docs/curvature.md`` and DESIGN.md
section 4; the penalties that use them live in ``kronlink.penalties``."""

from kronlink.curvature.estimate import estimate_curvature
from kronlink.curvature.state import (
    CurvatureKind,
    CurvatureState,
    EKFACFactors,
    FisherType,
    KFACFactors,
    LayerInfo,
    Rule,
    SplitFactors,
    TaskState,
)

__all__ = [
    "CurvatureKind",
    "CurvatureState",
    "EKFACFactors",
    "FisherType",
    "KFACFactors",
    "LayerInfo",
    "Rule",
    "SplitFactors",
    "TaskState",
    "estimate_curvature",
]
