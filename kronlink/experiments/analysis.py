"""Where a penalty's weight sits: ``Ω_i`` of one prior split by layer, under
each curvature the prior has (KFC, EKFAC, EWC), for the report's "which
layers dominate the penalty" table.

KFC is split by ``KFCPenalty.by_layer`` (its batched terms mix layers of
equal shapes) and EKFAC with the penalty's own per-layer terms (one term per
Kronecker layer, in the state's layer order, then one for the diagonal-only
parameters), so the parts add up to ``penalty.per_task`` exactly; EWC's
``Σ_j F_jj Δ_j²`` is summed per module.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from kronlink.curvature import CurvatureKind, TaskState
from kronlink.penalties import KFCPenalty, build_penalty

__all__ = ["layer_group", "omega_by_layer"]


def layer_group(module: str) -> str:
    """A coarse name for a module: ``query_convs.1`` -> ``query_convs``,
    ``encoder.encoder.layer.2.attention.self.query`` -> ``encoder layer 2``."""
    parts = module.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts):
            return f"encoder layer {parts[i + 1]}"
    if parts[0] == "encoder" and len(parts) > 1:
        return f"encoder {parts[1]}" if parts[1] != "encoder" else "encoder"
    return parts[0]


@torch.no_grad()
def omega_by_layer(model: nn.Module, prior: TaskState) -> dict[str, dict[str, float]]:
    """``{method: {module: Ω part}}`` for every method the prior's curvature allows."""
    cs = prior.curvature
    out: dict[str, dict[str, float]] = {}
    for method, kind, layers in (
        ("kfc", CurvatureKind.KFAC, list(cs.kfac)),
        ("ekfac", CurvatureKind.EKFAC, list(cs.ekfac)),
    ):
        if kind not in cs.kinds:
            continue
        penalty = build_penalty(method, [prior], 1.0)
        if isinstance(penalty, KFCPenalty):
            out[method] = penalty.by_layer(model)
            continue
        params, terms = penalty._prepared(model)
        names = layers + (["(diagonal-only parameters)"] if len(terms[0]) > len(layers) else [])
        out[method] = {n: float(t(params)) for n, t in zip(names, terms[0], strict=True)}
    if CurvatureKind.DIAG in cs.kinds:
        params = dict(model.named_parameters())
        parts: dict[str, float] = defaultdict(float)
        for name, f in cs.diag.items():
            p = params[name]
            delta = p.detach() - prior.anchor[name].to(p.device, p.dtype)
            parts[name.rsplit(".", 1)[0]] += float((f.to(p.device, p.dtype) * delta.square()).sum())
        out["ewc"] = dict(parts)
    return out
