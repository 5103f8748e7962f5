"""The paper's Figure 2 on a toy CNN: the full empirical Fisher of the
ranker's last two layers beside its KFAC, EKFAC and diagonal approximations,
and each approximation's relative error against the full matrix.

The toy is the real CNN ranker with a character vocabulary and narrow
layers, trained for a few epochs on a real task's train queries; its last
two layers are the paper's 10x10 and 10x1 linear layers, 110 + 11
parameters with their biases, so the full Fisher is a 121 x 121 matrix.

- Full: ``F = (1/N) Σ_n v_n v_nᵀ`` with ``v_n`` the gradient of query n's loss
  with respect to ``[vec W̄_1; vec W̄_2]`` (``W̄ = [W, b]``, ``vec`` stacks
  columns), one backward pass per query: independent of the estimator.
- KFAC: ``A ⊗ G`` per layer (``torch.kron(A, G)``, since
  ``vec(g x̄ᵀ) = x̄ ⊗ g``), zero between layers.
- EKFAC: ``(U_A ⊗ U_G) diag(vec s) (U_A ⊗ U_G)ᵀ`` per layer.
- Diagonal: ``diag(F_jj)``.
- Relative error: ``‖F_approx - F‖_F / ‖F‖_F``, over the whole matrix and
  per layer block.

The approximations come from ``kronlink.curvature.estimate_curvature``, the
estimator every penalty uses; the model runs in float64 for this.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kronlink.curvature import estimate_curvature
from kronlink.data.schema import Query
from kronlink.models import build_ranker, ranking_loss
from kronlink.models.base import Ranker
from kronlink.training import TrainConfig, seed_everything, train

__all__ = [
    "diag_dense",
    "ekfac_dense",
    "figure2_run",
    "full_fisher",
    "kfac_dense",
    "last_linear_layers",
    "relative_error",
    "vec_col",
]


def vec_col(m: Tensor) -> Tensor:
    """Column-stacking ``vec`` of a matrix (the convention of ``A ⊗ G``)."""
    return m.T.reshape(-1)


def relative_error(approx: Tensor, full: Tensor) -> float:
    """``‖approx - full‖_F / ‖full‖_F``."""
    return float(torch.linalg.matrix_norm(approx - full) / torch.linalg.matrix_norm(full))


def kfac_dense(A: Tensor, G: Tensor) -> Tensor:
    return torch.kron(A, G)


def ekfac_dense(UA: Tensor, UG: Tensor, s: Tensor) -> Tensor:
    U = torch.kron(UA, UG)
    return U @ torch.diag(vec_col(s)) @ U.T


def diag_dense(weight_diag: Tensor, bias_diag: Tensor | None) -> Tensor:
    bar = weight_diag if bias_diag is None else torch.cat([weight_diag, bias_diag[:, None]], 1)
    return torch.diag(vec_col(bar))


def last_linear_layers(model: nn.Module, n: int = 2) -> list[str]:
    """Names of the last ``n`` Linear modules, in order."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-n:]


def full_fisher(model: Ranker, queries: Sequence[Query], layers: Sequence[str]) -> Tensor:
    """The empirical Fisher of ``layers``' ``[W, b]`` by one backward per query."""
    modules = dict(model.named_modules())
    params = [p for name in layers for p in (modules[name].weight, modules[name].bias)]
    model.eval()
    rows = []
    for q in queries:
        batch = model.encode([q]).to(model.device)
        if int(batch.labels[0]) < 0:
            continue  # no gold among the candidates: no loss, as in the estimator
        loss = ranking_loss(model(batch), batch.candidate_mask, batch.labels, reduction="sum")
        grads = torch.autograd.grad(loss, params)
        parts = [
            vec_col(torch.cat([gw, gb[:, None]], dim=1))
            for gw, gb in zip(grads[0::2], grads[1::2], strict=True)
        ]
        rows.append(torch.cat(parts))
    v = torch.stack(rows)
    return v.T @ v / len(rows)


def _block_diag(blocks: Sequence[Tensor]) -> Tensor:
    return torch.block_diag(*blocks)


def figure2_run(queries: Sequence[Query], spec: Any, out: Path) -> dict:
    """Train the toy, compute the four matrices, save them to ``out``
    (safetensors) and return the relative errors and sizes."""
    t0 = time.perf_counter()
    picked = list(queries)
    random.Random(0).shuffle(picked)
    picked = picked[: spec.queries]
    seed_everything(0)
    model = build_ranker(
        "cnn",
        tokenizer=None,
        embedding_dim=spec.embedding_dim,
        channels=spec.channels,
        hidden_size=spec.hidden_size,
        dropout=0.0,
    )
    cfg = TrainConfig(epochs=spec.epochs, lr=3e-3, head_lr=None, device="cpu", seed=0)
    trained = train(model, picked, (), cfg)
    model = model.double()
    layers = last_linear_layers(model)
    full = full_fisher(model, picked, layers)
    batches = [model.encode(picked[i : i + 32]) for i in range(0, len(picked), 32)]
    state = estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag"))
    kf, ek, dg, sizes = [], [], [], []
    for name in layers:
        f, e = state.kfac[name], state.ekfac[name]
        kf.append(kfac_dense(f.A, f.G))
        ek.append(ekfac_dense(e.UA, e.UG, e.s))
        dg.append(diag_dense(state.diag[f"{name}.weight"], state.diag[f"{name}.bias"]))
        sizes.append(kf[-1].shape[0])
    mats = {
        "full": full,
        "kfac": _block_diag(kf),
        "ekfac": _block_diag(ek),
        "diag": _block_diag(dg),
    }
    errors = {k: relative_error(mats[k], full) for k in ("kfac", "ekfac", "diag")}
    blocks: dict[str, dict[str, float]] = {}
    start = 0
    for name, size in zip(layers, sizes, strict=True):
        sl = slice(start, start + size)
        blocks[name] = {k: relative_error(mats[k][sl, sl], full[sl, sl]) for k in errors}
        start += size
    out.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own, then a rename: a reader never sees half a file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in mats.items()}, str(tmp))
    os.replace(tmp, out)
    return {
        "relative_error": errors,
        "relative_error_blocks": blocks,
        "layers": [
            {"name": n, "shape": list(dict(model.named_modules())[n].weight.shape), "size": s}
            for n, s in zip(layers, sizes, strict=True)
        ],
        "n_queries": state.n_examples,
        "final_loss": trained.history[-1]["loss"] if trained.history else None,
        "seconds": time.perf_counter() - t0,
    }
