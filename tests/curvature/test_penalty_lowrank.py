"""The split rule's mean pair taken as ``B diag(λ) Bᵀ``, against dense Kronecker products.

``KFCPenalty`` factors a mean-pair factor (rank at most ``n_examples``: one
outer product per query) once per penalty and works with ``Bᵀ Δ̄`` instead
of ``G Δ̄``. The reference is ``vec(Δ̄)ᵀ (A_mean ⊗ G_mean + A_dev ⊗ G_dev)
vec(Δ̄)`` with ``torch.kron``, differentiated by autograd, in float64, on
fresh random factors and fresh random points.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cv_models import assert_same_value_and_grads, word_queries

from kronlink.curvature import TaskState, estimate_curvature
from kronlink.curvature.state import Rule, SplitFactors
from kronlink.models import build_ranker
from kronlink.penalties import (
    KFCPenalty,
    _grouped_kfc,
    _GroupPlan,
    _low_rank,
    _other_terms,
    _Quad,
)

TINY = {"encoder": None, "num_layers": 2, "max_length": 40}
RANK = 4  # the n_examples the state claims: every mean factor's rank bound


def _psd(n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return u @ u.T / rank


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_factor_reconstructs_and_refuses(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = _psd(64, 5, g).to(dtype)
    got = _low_rank(t, 5)
    assert got is not None
    b, lam = got
    assert b.shape == (64, 5 + 8) and lam.shape == (5 + 8,)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(((b * lam) @ b.T - t).norm()) <= tol * float(t.norm())
    # a full-rank matrix that claims rank 5 (a state built by hand): keep it full
    assert _low_rank(t + torch.eye(64, dtype=dtype), 5) is None
    # no saving once the rank bound passes half the size
    assert _low_rank(_psd(40, 15, g).to(dtype), 15) is None


def _state_with_random_split(model, g: torch.Generator) -> TaskState:
    batches = [model.encode(word_queries(6, s)) for s in (1, 2)]
    state = estimate_curvature(model, batches)
    split = {}
    for i, (name, sp) in enumerate(state.split.items()):
        a, q = sp.A_mean.shape[0], sp.G_mean.shape[0]
        # layer 0's query G_mean breaks the rank bound: its group's G side
        # must stay full while the A side goes low rank (a mixed pair).
        g_mean = _psd(q, q if i == 0 else RANK, g)
        split[name] = SplitFactors(_psd(a, RANK, g), g_mean, _psd(a, a, g), _psd(q, q, g))
    assert "attention.self.query" in next(iter(state.split))
    state = dataclasses.replace(state, split=split, n_examples=RANK)
    return TaskState.from_model(model, state, {"task": "t"})


def _dense(model, prior: TaskState) -> torch.Tensor:
    cs = prior.curvature
    params = {n: p.double() for n, p in model.named_parameters()}
    anchor = {n: t.double() for n, t in prior.anchor.items()}
    total = torch.zeros((), dtype=torch.float64)
    for name, f in cs.kfac.items():
        info = cs.layers[name]
        if info.rule is Rule.EMBEDDING:
            # every row, brute force: vec(Δ_lin)ᵀ (diag(a) ⊗ G) vec(Δ_lin), Δ_lin = Δwᵀ
            dw = params[info.param_names[0]] - anchor[info.param_names[0]]
            total = total + (dw * (dw @ f.G.double()) * f.A.double()[:, None]).sum()
            continue
        w = params[info.param_names[0]] - anchor[info.param_names[0]]
        d = w.reshape(w.shape[0], -1)
        if info.bias:
            d = torch.cat(
                [d, (params[info.param_names[1]] - anchor[info.param_names[1]])[:, None]], 1
            )
        v = d.T.reshape(-1)  # column-stacking vec
        if name in cs.exact:
            F = cs.exact[name].double()
        else:
            sp = cs.split[name]
            F = torch.kron(sp.A_mean, sp.G_mean) + torch.kron(sp.A_dev, sp.G_dev)
        total = total + v @ F.double() @ v
    terms = _other_terms(prior, lambda t: t.double())
    return total + sum((t(params) for t in terms), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_split_penalty_equals_dense_kronecker(dtype) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build_ranker("transformer", **TINY).to(dtype)
    prior = _state_with_random_split(model, g)
    pen = KFCPenalty([prior], 1.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for trial in range(3):  # fresh random points
        gp = torch.Generator().manual_seed(10 + trial)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gp, dtype=torch.float64).to(dtype))
        got = pen(model)
        want = _dense(model, prior)
        assert_same_value_and_grads(model, got, want, tol)


def test_low_rank_plan_covers_all_slot_kinds() -> None:
    """The state above exercises every kind of slot: both sides low rank, a
    mixed pair, and full pairs (the deviations) batched together."""
    torch.manual_seed(0)
    model = build_ranker("transformer", **TINY).double()
    prior = _state_with_random_split(model, torch.Generator().manual_seed(1))
    quads = [p for _, p in KFCPenalty([prior], 1.0)._layer_parts(prior, lambda t: t)]
    quads = [q for q in quads if isinstance(q, _Quad)]
    kinds = set()
    for term in _grouped_kfc(quads):
        cells = [c.cell_contents for c in term.__closure__ or ()]
        plan = next(c for c in cells if isinstance(c, _GroupPlan))
        kinds.add(("full", plan.G is not None))
        kinds |= {(s.g_lam is not None, s.a_lam is not None) for s in plan.low}
    assert {("full", True), (True, True), (False, True)} <= kinds
