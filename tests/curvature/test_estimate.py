"""The estimator against brute force: exactness of A ⊗ G for one example at
one position, the diagonal Fisher and EKFAC scalings against a loop over
single examples, padding invariance, and the errors it raises."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cv_models import (
    ConvRanker,
    MiniCrossEncoder,
    MLPRanker,
    QueryRanker,
    conv_batch,
    cross_batch,
    mlp_batch,
)
from torch import nn

from kronlink.curvature import estimate_curvature
from kronlink.errors import ConfigError, UnsupportedModuleError
from kronlink.models.base import Ranker, RankerBatch, ranking_loss

# Named tolerances (relative Frobenius errors, float64).
EXACT = 1e-12  # same quantity, different float64 summation order
BRUTE = 1e-10  # a loop over single examples: the same sums, in float64


FLOOR = 1e-13  # absolute floor: a ranker's head bias gets Σ_c (p_c - y_c) = 0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error, with an absolute floor for quantities that
    are zero up to rounding."""
    return float((a - b).norm() / b.norm().clamp_min(FLOOR))


def per_example_grads(model: Ranker, batches: list[RankerBatch]) -> list[dict[str, torch.Tensor]]:
    """∇θ ℓ_n for every labelled query, one backward per query (the slow,
    obviously correct way)."""
    model.eval()
    params = dict(model.named_parameters())
    out = []
    for batch in batches:
        for i in range(batch.size):
            if batch.labels[i] < 0:
                continue
            scores = model(batch)
            loss = ranking_loss(scores, batch.candidate_mask, batch.labels, "none")[i]
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            out.append(
                {
                    n: torch.zeros_like(p) if g is None else g
                    for (n, p), g in zip(params.items(), grads, strict=True)
                }
            )
    return out


def wbar(grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """∇W̄ = [∇W.reshape(q, -1), ∇b]."""
    w = grads[f"{name}.weight"]
    w = w.reshape(w.shape[0], -1)
    b = grads.get(f"{name}.bias")
    return w if b is None else torch.cat([w, b[:, None]], 1)


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec, the convention of A ⊗ G."""
    return m.T.reshape(-1)


EXACT_CASES = {
    "linear": (lambda g: torch.randn(1, 4, generator=g, dtype=torch.float64)),
    "conv": (lambda g: torch.randn(1, 2, 3, generator=g, dtype=torch.float64)),
    "embedding": (lambda g: torch.randint(0, 7, (1,), generator=g)),
}


@pytest.mark.parametrize("first", list(EXACT_CASES))
def test_kfac_is_exact_for_one_example_at_one_position(first: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = QueryRanker(first).double()
    c = 5
    batch = RankerBatch(
        {"x": EXACT_CASES[first](g)},
        torch.ones(1, c, dtype=torch.bool),
        torch.tensor([2]),
    )
    state = estimate_curvature(model, [batch], kinds=("kfac", "ekfac", "diag"))
    grads = per_example_grads(model, [batch])[0]
    for name in ("l1", "head"):
        f = state.kfac[name]
        if state.layers[name].rule == "embedding":
            # W_lin = weightᵀ (d, V): its column-stacking vec is weight's row-major flatten.
            v = grads[f"{name}.weight"].reshape(-1)
            block = torch.kron(torch.diag(f.A), f.G)
        else:
            v = vec(wbar(grads, name))
            block = torch.kron(f.A, f.G)
        exact = torch.outer(v, v)
        assert rel(block, exact) < EXACT, (first, name, rel(block, exact))
        # The diagonal Fisher is each parameter's squared gradient.
        for pname in (f"{name}.weight", f"{name}.bias"):
            if pname in grads and grads[pname].numel():
                d = state.diag[pname]
                assert rel(d, grads[pname].square()) < EXACT, (
                    first,
                    pname,
                    rel(d, grads[pname].square()),
                )
        # EKFAC's s is the squared gradient in the eigenbases of A and G.
        e = state.ekfac[name]
        if state.layers[name].rule == "embedding":
            brute = (grads[f"{name}.weight"] @ e.UG).square()
        else:
            brute = (e.UG.T @ wbar(grads, name) @ e.UA).square()
        assert rel(e.s, brute) < EXACT, (first, name, rel(e.s, brute))


def ranker_cases(seed: int, extra: Callable[[torch.Generator], dict] | None = None) -> dict:
    """The three float64 rankers with two ragged batches each, seeded; ``extra``
    adds cases drawn from the same generator after them."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cases = {
        "mlp": (MLPRanker().double(), [mlp_batch(6, 4, 5, g), mlp_batch(3, 4, 5, g)]),
        "cross": (
            MiniCrossEncoder().double(),
            [cross_batch(5, 4, 6, 11, g), cross_batch(4, 3, 5, 11, g)],
        ),
        "conv": (ConvRanker().double(), [conv_batch(5, 4, 3, 7, g), conv_batch(3, 4, 3, 6, g)]),
    }
    return {**cases, **(extra(g) if extra else {})}


RANKERS = ["mlp", "cross", "conv"]


@pytest.mark.parametrize("case", RANKERS)
def test_diag_and_ekfac_match_loop_over_examples(case: str) -> None:
    model, batches = ranker_cases(3)[case]
    batches[0].labels[1] = -1  # skipped query: counts nowhere
    state = estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag"))
    grads = per_example_grads(model, batches)
    assert state.n_examples == len(grads)
    n = len(grads)
    for pname, d in state.diag.items():
        brute = sum(gr[pname].square() for gr in grads) / n
        err = rel(d, brute)
        assert err < BRUTE, (pname, err)
    for name, e in state.ekfac.items():
        info = state.layers[name]
        if info.rule == "embedding":
            brute = sum((gr[f"{name}.weight"] @ e.UG).square() for gr in grads) / n
        else:
            brute = sum((e.UG.T @ wbar(gr, name) @ e.UA).square() for gr in grads) / n
        assert rel(e.s, brute) < BRUTE, (name, rel(e.s, brute))
    for f in state.kfac.values():  # symmetric factors
        assert torch.equal(f.G, f.G.T) or rel(f.G, f.G.T) < EXACT


def _pad(batch: RankerBatch, case: str, g: torch.Generator) -> RankerBatch:
    """Two more padded candidates and two more padded tokens per row, filled
    with garbage that the masks must hide."""
    b, c = batch.candidate_mask.shape
    cmask = torch.cat([batch.candidate_mask, torch.zeros(b, 2, dtype=torch.bool)], 1)
    f = dict(batch.features)
    if case == "mlp":
        f["x"] = torch.cat(
            [f["x"], torch.randn(b, 2, f["x"].shape[2], generator=g, dtype=torch.float64)], 1
        )
    else:
        key = "ids" if case == "cross" else "x"
        x, tok = f[key], f["tok_mask"]
        t = tok.shape[-1]
        tok = torch.cat([tok, torch.zeros(b, c, 2, dtype=torch.bool)], -1)
        tok = torch.cat([tok, torch.rand(b, 2, t + 2, generator=g) < 0.5], 1)
        if case == "cross":
            x = torch.cat([x, torch.randint(1, 11, (b, c, 2), generator=g)], -1)
            x = torch.cat([x, torch.randint(0, 11, (b, 2, t + 2), generator=g)], 1)
        else:  # conv inputs are zero at padded tokens (as zero padding)
            x = torch.cat([x, torch.zeros(*x.shape[:3], 2, dtype=x.dtype)], -1)
            x = torch.cat([x, torch.randn(b, 2, x.shape[2], t + 2, generator=g, dtype=x.dtype)], 1)
        f[key], f["tok_mask"] = x, tok
    return RankerBatch(f, cmask, batch.labels)


@pytest.mark.parametrize("case", RANKERS)
def test_padding_changes_no_factor(case: str) -> None:
    model, batches = ranker_cases(3)[case]
    g = torch.Generator().manual_seed(9)
    padded = [_pad(b, case, g) for b in batches]
    s1 = estimate_curvature(model, batches)
    s2 = estimate_curvature(model, padded)
    for name in s1.kfac:
        assert rel(s2.kfac[name].A, s1.kfac[name].A) < EXACT, name
        assert rel(s2.kfac[name].G, s1.kfac[name].G) < EXACT, name
        assert rel(s2.ekfac[name].s, s1.ekfac[name].s) < 1e-9, name
    for pname in s1.diag:
        assert rel(s2.diag[pname], s1.diag[pname]) < EXACT, pname


def test_true_fisher_is_reproducible_and_differs_from_empirical() -> None:
    model, batches = ranker_cases(3)["cross"]
    a = estimate_curvature(
        model, batches, fisher="true", generator=torch.Generator().manual_seed(0)
    )
    b = estimate_curvature(
        model, batches, fisher="true", generator=torch.Generator().manual_seed(0)
    )
    e = estimate_curvature(model, batches, fisher="empirical")
    assert torch.equal(a.kfac["proj"].G, b.kfac["proj"].G)
    assert not torch.allclose(a.kfac["proj"].G, e.kfac["proj"].G)
    # A does not depend on labels.
    assert rel(a.kfac["proj"].A, e.kfac["proj"].A) < EXACT
    assert a.fisher == "true" and a.n_examples == sum(bt.size for bt in batches)


def test_include_other_false_drops_layernorm_and_progress_is_called() -> None:
    model, batches = ranker_cases(3)["cross"]
    steps = []
    s = estimate_curvature(
        model,
        batches,
        kinds=("kfac",),
        include_other=False,
        progress=lambda i, n: steps.append((i, n)),
    )
    assert "norm" not in s.layers and not s.diag and set(s.kfac) == {"emb", "proj", "head"}
    assert steps == [(1, 2), (2, 2)]
    s2 = estimate_curvature(model, batches, kinds=("kfac",))
    assert set(s2.diag) == {"norm.weight", "norm.bias"}


class _WithMHA(MLPRanker):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1)


class _WithParam(MLPRanker):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))


@pytest.mark.parametrize("cls", [_WithMHA, _WithParam])
def test_unsupported_module_is_named(cls) -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(UnsupportedModuleError, match=r"attn|<root>"):
        estimate_curvature(cls().double(), [mlp_batch(2, 3, 5, g)])


def test_bad_options() -> None:
    model, batches = ranker_cases(3)["mlp"]
    with pytest.raises(ConfigError):
        estimate_curvature(model, batches, kinds=("kfc",))
    with pytest.raises(ConfigError):
        estimate_curvature(model, batches, fisher="mc")
    with pytest.raises(ConfigError, match="two passes"):
        estimate_curvature(model, iter(batches))
    estimate_curvature(model, iter(batches), kinds=("kfac", "diag"))  # one pass: fine
