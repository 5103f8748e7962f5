"""Penalties against their explicit dense forms, and the paper's Figure 1."""

from __future__ import annotations

import pytest
import torch
from cv_models import ConvRanker, MiniCrossEncoder, conv_batch, cross_batch
from torch import nn

from kronlink import penalties
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.errors import ConfigError
from kronlink.models.base import Ranker, RankerBatch, TokenLayout, ranking_loss
from kronlink.penalties import (
    EKFACExpandPenalty,
    EKFACPenalty,
    EWCPenalty,
    KFCExpandPenalty,
    KFCPenalty,
    L2Penalty,
    NoPenalty,
    build_penalty,
    predicted_forgetting,
)

QUADRATIC = 1e-10  # two-product form vs torch.kron, float64


def vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)


def _prior(case: str) -> tuple[Ranker, TaskState]:
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    if case in ("cross", "cross-sparse"):
        # "cross-sparse": the batch uses 10 of 40 tokens, so most embedding
        # rows have zero curvature and the penalties take their gathered path.
        model = MiniCrossEncoder(vocab=40 if case == "cross-sparse" else 11).double()
        batches = [cross_batch(6, 4, 5, 11, g)]
    else:
        model = ConvRanker().double()
        batches = [conv_batch(6, 4, 3, 6, g)]
    state = estimate_curvature(model, batches)
    prior = TaskState.from_model(model, state, {"task": case})
    with torch.no_grad():  # move away from the anchor
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, prior


def _dense_omega(model: Ranker, prior: TaskState, method: str) -> torch.Tensor:
    """Ω from explicit dense matrices (torch.kron), differentiable. "kfc" and
    "ekfac" use the exact block where the state has one, "kfc" the split
    factors on other Linear/Conv1d layers; the "-expand" methods neither."""
    expand = method.endswith("-expand")
    method = method.removesuffix("-expand")
    params = dict(model.named_parameters())
    cs = prior.curvature
    total = torch.zeros((), dtype=torch.float64)
    for name, info in cs.layers.items():
        deltas = {n: params[n] - prior.anchor[n] for n in info.param_names}
        if not info.kronecker:
            if cs.include_other:
                total = total + sum((cs.diag[n] * d.square()).sum() for n, d in deltas.items())
            continue
        if info.rule == "embedding":
            v = deltas[info.param_names[0]].reshape(-1)  # vec of W_lin = weightᵀ
            if method == "kfc":
                f = cs.kfac[name]
                F = torch.kron(torch.diag(f.A), f.G)
            else:
                e = cs.ekfac[name]
                U = torch.kron(torch.eye(info.a_dim, dtype=torch.float64), e.UG)
                F = U @ torch.diag(e.s.reshape(-1)) @ U.T
        else:
            dw = deltas[info.param_names[0]].reshape(info.g_dim, -1)
            if info.bias:
                dw = torch.cat([dw, deltas[info.param_names[1]][:, None]], 1)
            v = vec(dw)
            if not expand and name in cs.exact:
                F = cs.exact[name]
            elif method == "kfc" and not expand:
                sp = cs.split[name]
                F = torch.kron(sp.A_mean, sp.G_mean) + torch.kron(sp.A_dev, sp.G_dev)
            elif method == "kfc":
                f = cs.kfac[name]
                F = torch.kron(f.A, f.G)
            else:
                e = cs.ekfac[name]
                U = torch.kron(e.UA, e.UG)
                F = U @ torch.diag(vec(e.s)) @ U.T
        total = total + v @ F @ v
    return total


@pytest.mark.parametrize("case", ["cross", "cross-sparse", "conv"])
@pytest.mark.parametrize(
    ("method", "cls"),
    [
        ("kfc", KFCPenalty),
        ("ekfac", EKFACPenalty),
        ("kfc-expand", KFCExpandPenalty),
        ("ekfac-expand", EKFACExpandPenalty),
    ],
)
def test_two_product_form_equals_dense_kronecker(case: str, method: str, cls) -> None:
    model, prior = _prior(case)
    pen = cls([prior], [1.0])
    got = pen(model)
    (g_got,) = torch.autograd.grad(
        got, [model.get_submodule(next(iter(prior.curvature.kfac))).weight]
    )
    want = _dense_omega(model, prior, method)
    (g_want,) = torch.autograd.grad(
        want, [model.get_submodule(next(iter(prior.curvature.kfac))).weight]
    )
    assert abs(float((got - want).detach())) <= QUADRATIC * abs(float(want.detach()))
    all_got = torch.autograd.grad(pen(model), list(model.parameters()))
    all_want = torch.autograd.grad(_dense_omega(model, prior, method), list(model.parameters()))
    for a, b in zip(all_got, all_want, strict=True):
        a = a.to_dense() if a.is_sparse else a  # an embedding's rows (penalties.py)
        assert (a - b).norm() <= QUADRATIC * b.norm() + 1e-15
    g_got = g_got.to_dense() if g_got.is_sparse else g_got
    assert (g_got - g_want).norm() <= QUADRATIC * g_want.norm()


@torch.no_grad()
@pytest.mark.parametrize("case", ["cross", "cross-sparse"])
def test_ewc_l2_none_and_lambdas(case: str) -> None:
    model, prior = _prior(case)
    params = dict(model.named_parameters())
    ewc = sum(
        (prior.curvature.diag[n] * (params[n] - a).square()).sum() for n, a in prior.anchor.items()
    )
    l2 = sum((params[n] - a).square().sum() for n, a in prior.anchor.items())
    assert abs(float(EWCPenalty([prior], 1.0)(model) - ewc)) <= QUADRATIC * float(ewc)
    assert abs(float(L2Penalty([prior], 1.0)(model) - l2)) <= QUADRATIC * float(l2)
    # Σ_i λ_i Ω_i over two priors; per_task reports Ω_i without λ.
    pen = build_penalty("kfc", [prior, prior], [10.0, 1000.0])
    om = pen.per_task(model)
    assert om[0] == pytest.approx(om[1]) and om[0] > 0
    assert float(pen(model)) == pytest.approx(1010.0 * om[0], rel=1e-12)
    # the forecast loss increase is ½ Ω (the penalty has no ½)
    assert predicted_forgetting(model, [prior]) == pytest.approx([0.5 * om[0]])
    assert float(NoPenalty([prior], 1.0)(model)) == 0.0
    assert NoPenalty([prior], 1.0).per_task(model) == [0.0]
    # at the anchor every penalty is zero
    for n, p in model.named_parameters():
        p.copy_(prior.anchor[n])
    for method in ("l2", "ewc", "kfc", "ekfac", "kfc-expand", "ekfac-expand"):
        assert float(build_penalty(method, [prior], 5.0)(model)) == pytest.approx(0.0, abs=1e-20)


def test_build_penalty_errors() -> None:
    _, prior = _prior("cross")
    with pytest.raises(ConfigError):
        build_penalty("kfac", [prior], 1.0)
    with pytest.raises(ConfigError):
        build_penalty("kfc", [prior, prior], [1.0])
    with pytest.raises(ConfigError):
        build_penalty("kfc", [prior], -1.0)


# ---- Figure 1 of the paper ------------------------------------------------


class _TwoParam(Ranker):
    """scores = w · x_c, w ∈ R² (a Linear 2 -> 1 without bias)."""

    kind = "test-two"

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(2, 1, bias=False)

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        return self.w(batch.features["x"]).squeeze(-1)

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b = batch.size
        return {"w": TokenLayout(batch.candidate_mask, torch.arange(b))}


def _task(direction: torch.Tensor, w_true: torch.Tensor, g: torch.Generator, n: int = 400):
    """Candidate features spread along ``direction`` (plus a little noise
    across it), labels drawn from softmax(w_true · x): the Fisher of w is
    elongated along ``direction``."""
    c = 4
    u = direction / direction.norm()
    perp = torch.stack([-u[1], u[0]])
    z = torch.randn(n, c, 1, generator=g, dtype=torch.float64)
    e = 0.05 * torch.randn(n, c, 1, generator=g, dtype=torch.float64)
    x = z * u + e * perp
    mask = torch.ones(n, c, dtype=torch.bool)
    probs = torch.softmax(x @ w_true, -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return RankerBatch({"x": x}, mask, labels)


def _fit(model: Ranker, batch: RankerBatch, penalty=None, steps: int = 200) -> None:
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ranking_loss(model(batch), batch.candidate_mask, batch.labels)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        return loss

    opt.step(closure)


def test_figure1_kfc_stays_closer_to_task_a_than_ewc() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    task_a = _task(
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        g,
    )
    task_b = _task(
        torch.tensor([1.0, -0.2], dtype=torch.float64),
        torch.tensor([-1.5, 2.5], dtype=torch.float64),
        g,
    )
    model = _TwoParam().double()
    _fit(model, task_a)
    state = estimate_curvature(model, [task_a], kinds=("kfac", "diag"))
    prior = TaskState.from_model(model, state)
    w_a = model.w.weight.detach().clone().reshape(-1)
    F = torch.kron(state.kfac["w"].A, state.kfac["w"].G)
    corr = F[0, 1] / (F[0, 0] * F[1, 1]).sqrt()
    assert corr > 0.9  # the tilted, strongly correlated Fisher of Figure 1

    ends = {}
    for method in ("ewc", "kfc"):
        m = _TwoParam().double()
        m.load_state_dict(model.state_dict())
        _fit(m, task_b, build_penalty(method, [prior], 1.0))
        ends[method] = m.w.weight.detach().reshape(-1)

    def fisher_dist(w: torch.Tensor) -> float:  # distance in task A's metric
        d = w - w_a
        return float((d @ F @ d).sqrt())

    def loss_a(w: torch.Tensor) -> float:
        with torch.no_grad():
            m = _TwoParam().double()
            m.w.weight.copy_(w.reshape(1, 2))
            return float(ranking_loss(m(task_a), task_a.candidate_mask, task_a.labels))

    ratio = fisher_dist(ends["kfc"]) / fisher_dist(ends["ewc"])
    assert ratio < 0.5, ratio
    assert loss_a(ends["kfc"]) < loss_a(ends["ewc"])


@pytest.mark.parametrize("method", ["kfc", "kfc-expand", "ekfac", "ewc"])
def test_an_embeddings_penalty_gradient_touches_only_the_priors_rows(method: str) -> None:
    """The embedding terms gather the rows the prior task used and send back a
    sparse gradient (penalties._GatherRows). In a training step it adds into
    the model's dense gradient: the same .grad as index_select's dense one, to
    rounding, and AdamW steps as before. Of the penalty alone it is sparse,
    with exactly the prior's rows."""
    from kronlink.penalties import build_penalty

    model, prior = _prior("cross-sparse")
    g = torch.Generator().manual_seed(9)
    batch = cross_batch(6, 4, 5, 40, g)  # uses rows the prior never saw too

    def step_grads(gather) -> dict[str, torch.Tensor]:
        original = penalties._GatherRows.apply
        penalties._GatherRows.apply = gather
        try:
            pen = build_penalty(method, [prior], 3.0)
            model.zero_grad(set_to_none=True)
            scores = model(batch)
            loss = ranking_loss(scores, batch.candidate_mask, batch.labels) + pen(model)
            loss.backward()
        finally:
            penalties._GatherRows.apply = original
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    sparse = step_grads(penalties._GatherRows.apply)
    dense = step_grads(lambda w, rows: w.index_select(0, rows))
    for n, got in sparse.items():
        assert got.layout == torch.strided, n
        assert (got - dense[n]).norm() <= 1e-12 * dense[n].norm() + 1e-300, n
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()  # a dense .grad: no error

    (emb,) = [p for n, p in model.named_parameters() if n.startswith("emb")]
    (alone,) = torch.autograd.grad(build_penalty(method, [prior], 3.0)(model), [emb])
    assert alone.is_sparse
    touched = set(alone.coalesce().indices()[0].tolist())
    used = prior.curvature.diag if method == "ewc" else None
    if used is not None:
        want = set(used["emb.weight"].ne(0).any(1).nonzero().squeeze(1).tolist())
    else:
        layer = next(n for n, i in prior.curvature.layers.items() if i.rule.value == "embedding")
        factor = prior.curvature.kfac[layer].A if method != "ekfac" else None
        want = (
            set(factor.nonzero().squeeze(1).tolist())
            if factor is not None
            else set(prior.curvature.ekfac[layer].s.ne(0).any(1).nonzero().squeeze(1).tolist())
        )
    assert touched == want and 0 < len(want) < emb.shape[0] // 2, (touched, want)
