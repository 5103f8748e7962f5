"""The grouped, fused KFC penalty against the unfused per-layer form.

``KFCPenalty`` stacks equal-shape layers into one batched product and takes
the gradient as ``2 G Δ̄ A`` (symmetric factors) instead of differentiating
the products. The reference here is the per-layer expression
``Σ_k sum(Δ̄ ⊙ (G_k Δ̄ A_k))`` differentiated by autograd, in float64, on
fresh random moves away from the anchor of both real rankers (tiny sizes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cv_models import assert_same_value_and_grads, word_queries

from kronlink import penalties
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.curvature.state import Rule
from kronlink.models import build_ranker
from kronlink.penalties import (
    KFCExpandPenalty,
    KFCPenalty,
    _GroupPlan,
    _kfc_split,
    _other_terms,
    _Quad,
)

TINY = {
    "transformer": {"encoder": None, "num_layers": 3, "max_length": 40},
    "cnn": {"tokenizer": None, "embedding_dim": 16, "channels": 16, "hidden_size": 16},
}


def _reference(model, prior: TaskState, expand: bool) -> torch.Tensor:
    """Per layer, unfused, float64."""
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
            b = params[info.param_names[1]] - anchor[info.param_names[1]]
            d = torch.cat([d, b[:, None]], 1)
        if not expand and name in cs.exact:
            v = d.T.reshape(-1)
            total = total + v @ cs.exact[name].double() @ v
            continue
        if not expand and name in cs.split:
            sp = cs.split[name]
            pairs = [(sp.A_mean, sp.G_mean), (sp.A_dev, sp.G_dev)]
        else:
            pairs = [(f.A, f.G)]
        for A, G in pairs:
            total = total + (d * (G.double() @ d @ A.double())).sum()
    terms = _other_terms(prior, lambda t: t.double())
    return total + sum((t(params) for t in terms), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("cls", [KFCPenalty, KFCExpandPenalty])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_value_and_gradient_equal_unfused(kind: str, cls, dtype) -> None:
    torch.manual_seed(0)
    model = build_ranker(kind, **TINY[kind]).to(dtype)
    batches = [model.encode(word_queries(6, s)) for s in (1, 2)]
    state = estimate_curvature(model, batches)
    if kind == "transformer":  # equal-shape layers must share a batched product
        shapes = [tuple(model.get_submodule(n).weight.shape) for n in state.kfac]
        assert max(shapes.count(s) for s in shapes) >= 3
    prior = TaskState.from_model(model, state, {"task": "t"})
    pen = cls([prior], 1.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for trial in range(3):  # fresh random points: the penalty's cache must not go stale
        g = torch.Generator().manual_seed(10 + trial)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
        got = pen(model)
        want = _reference(model, prior, expand=cls is KFCExpandPenalty)
        assert_same_value_and_grads(model, got, want, tol)


def test_asymmetric_factors_fall_back_to_autograd() -> None:
    torch.manual_seed(0)
    model = build_ranker("cnn", **TINY["cnn"]).double()
    state = estimate_curvature(model, [model.encode(word_queries(6, 1))])
    name = next(n for n in state.split)
    sp = state.split[name]
    skew = torch.randn(sp.G_dev.shape, dtype=torch.float64)
    # not a Fisher any more, but the penalty must still be the expression's value/gradient
    state.split[name] = type(sp)(sp.A_mean, sp.G_mean, sp.A_dev, sp.G_dev + skew)
    prior = TaskState.from_model(model, state, {"task": "t"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    got = KFCPenalty([prior], 1.0)(model)
    want = _reference(model, prior, expand=False)
    ga = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    assert abs(float(got - want)) <= 1e-10 * abs(float(want))
    for a, b in zip(ga, gb, strict=True):
        if b is not None:
            a = a.to_dense() if a.is_sparse else a  # an embedding's rows (penalties.py)
            assert float((a - b).norm()) <= 1e-10 * float(b.norm()) + 1e-30


def test_cnn_conv_layers_share_one_batched_product_prepared_once(monkeypatch) -> None:
    """The CNN at its default widths (four 128 x 385 conv layers; only the
    vocabulary is the tests' small one), its state claiming 64 queries as in
    table 2 of bench/curvature.py, so that the split rule's mean pair goes low
    rank on the A side only, as there. The four conv layers are one group (one
    batched product over the stack), its operands stacked once, on the
    penalty's first call; value and gradient equal the per-layer form
    (``_kfc_split``, autograd through each layer's products) and the
    brute-force reference, on fresh random points."""
    torch.manual_seed(0)
    model = build_ranker("cnn", tokenizer=None).double()
    state = estimate_curvature(model, [model.encode(word_queries(8, s)) for s in (1, 2)])
    # 16 queries (a quarter of the estimate's time) under the bound of 64: still true
    state = dataclasses.replace(state, n_examples=64)
    prior = TaskState.from_model(model, state, {"task": "t"})
    builds = []
    grouped = penalties._grouped_kfc
    monkeypatch.setattr(
        penalties, "_grouped_kfc", lambda quads: builds.append(len(quads)) or grouped(quads)
    )
    pen = KFCPenalty([prior], 1.0)

    def per_layer(params: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = pen._layer_parts(prior, lambda t: t.double())
        terms = [
            _kfc_split(p.names, p.anchor, p.pairs) if isinstance(p, _Quad) else p for _, p in parts
        ] + _other_terms(prior, lambda t: t.double())
        return sum((t(params) for t in terms), torch.zeros((), dtype=torch.float64))

    for trial in range(3):  # fresh random points: the prepared operands must not go stale
        g = torch.Generator().manual_seed(20 + trial)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        got = pen(model)
        assert_same_value_and_grads(model, got, per_layer(dict(model.named_parameters())), 1e-10)
        assert_same_value_and_grads(model, pen(model), _reference(model, prior, False), 1e-10)
    assert builds == [5]  # once: the 4 conv layers and head.0 (exact blocks for the rest)

    convs = [n for n in prior.curvature.kfac if n.split(".")[0].endswith("convs")]
    assert len(convs) == 4
    plans = []
    for term in pen._prepared(model)[1][0]:
        cells = [c.cell_contents for c in term.__closure__ or ()]
        plan = next((c for c in cells if isinstance(c, _GroupPlan)), None)
        if plan is not None:
            names = next(c for c in cells if isinstance(c, list))
            plans.append(([n[0].removesuffix(".weight") for n in names], plan))
    (plan,) = [p for names, p in plans if sorted(names) == sorted(convs)]
    # the deviation pair full, stacked (4, 1, ·, ·); the mean pair's A side low rank
    assert tuple(plan.G.shape) == (4, 1, 128, 128) and tuple(plan.A.shape) == (4, 1, 385, 385)
    (slot,) = plan.low
    assert slot.g_lam is None and tuple(slot.G.shape) == (4, 128, 128)
    assert slot.a_lam is not None and tuple(slot.A.shape) == (4, 385, 64 + 8)
