"""Exact Fisher blocks and the candidate-aware ("split") rule against brute
force in float64, format-1 states, and Ω = ½ Δᵀ F Δ against the Hessian.

Brute force is one backward per query (``per_example_grads``): the exact
block is ``E_n[vec ∇W̄_n vec ∇W̄_nᵀ]`` of those gradients, on fresh random
inputs each run of the generator seeds below."""

from __future__ import annotations

import json

import pytest
import torch
from cv_models import (
    MLPRanker,
    QueryRanker,
    TokenRanker,
    random_labels,
)
from test_estimate import BRUTE, EXACT, per_example_grads, ranker_cases, rel, vec, wbar

from kronlink.curvature import TaskState, _io, estimate_curvature
from kronlink.errors import ConfigError
from kronlink.models.base import RankerBatch, ranking_loss
from kronlink.penalties import build_penalty, predicted_forgetting


def _token_batch(b: int, c: int, t: int, p: int, g: torch.Generator) -> RankerBatch:
    x = torch.randn(b, c, t, p, generator=g, dtype=torch.float64)
    cmask = torch.ones(b, c, dtype=torch.bool)
    return RankerBatch({"x": x}, cmask, random_labels(cmask, g))


def _cases(seed: int) -> dict:
    return ranker_cases(
        seed, lambda g: {"token": (TokenRanker().double(), [_token_batch(4, 3, 5, 4, g)])}
    )


CASES = ["mlp", "cross", "conv", "token"]


@pytest.mark.parametrize("case", CASES)
def test_exact_blocks_equal_brute_force(case: str) -> None:
    seed = int(torch.randint(0, 2**20, ()).item())  # fresh inputs each run
    model, batches = _cases(seed)[case]
    batches[0].labels[1] = -1  # a skipped query counts nowhere
    state = estimate_curvature(model, batches, kinds=("kfac", "diag"))
    grads = per_example_grads(model, batches)
    n = len(grads)
    linear = [k for k, i in state.layers.items() if i.rule in ("linear", "conv1d")]
    assert set(state.exact) == set(linear), (seed, case)  # all tiny: all exact
    for name, f in state.exact.items():
        vs = torch.stack([vec(wbar(gr, name)) for gr in grads])
        brute = vs.T @ vs / n
        assert rel(f, brute) < BRUTE, (seed, case, name, rel(f, brute))


def test_exact_threshold_and_off() -> None:
    model, batches = _cases(7)["cross"]
    # head: 4 + 1 = 5 parameters; proj: 4 x 5 = 20
    state = estimate_curvature(model, batches, kinds=("kfac",), exact_max_params=10)
    assert set(state.exact) == {"head"}
    assert state.exact["head"].shape == (5, 5)
    assert estimate_curvature(model, batches, kinds=("kfac",), exact_max_params=0).exact == {}
    # only the diagonal asked for: no Kronecker blocks at all
    assert estimate_curvature(model, batches, kinds=("diag",)).exact == {}
    with pytest.raises(ConfigError):
        estimate_curvature(model, batches, exact_max_params=-1)


@pytest.mark.parametrize("case", CASES)
def test_split_bias_block_is_exact(case: str) -> None:
    """The bias column of every deviation ``x̄ - m`` is 0 and of every mean
    ``m`` is 1, so the split rule's bias block is ``G_mean = E[(Σ_t g)(Σ_t g)ᵀ]``:
    the exact bias Fisher, for a layer at any number of positions. The expand
    rule's is ``G``, which counts positions as independent samples."""
    seed = int(torch.randint(0, 2**20, ()).item())
    model, batches = _cases(seed)[case]
    state = estimate_curvature(model, batches, kinds=("kfac",), exact_max_params=0)
    grads = per_example_grads(model, batches)
    n = len(grads)
    for name, sp in state.split.items():
        info = state.layers[name]
        if not info.bias:
            continue
        gb = torch.stack([gr[f"{name}.bias"] for gr in grads])
        brute = gb.T @ gb / n
        assert float(sp.A_dev[-1].abs().max()) == 0.0, (case, name)
        assert abs(float(sp.A_mean[-1, -1]) - 1.0) < EXACT, (case, name)
        split_block = sp.A_mean[-1, -1] * sp.G_mean + sp.A_dev[-1, -1] * sp.G_dev
        assert rel(split_block, brute) < BRUTE, (seed, case, name, rel(split_block, brute))
        if name.endswith("head"):
            # a scalar score head: Σ_c (p_c - y_c) = 0, so the bias Fisher is 0 ...
            assert float(brute.abs().max()) < 1e-20
            assert float(split_block.abs().max()) < 1e-20
            # ... where the expand rule gives it a clearly positive value
            f = state.kfac[name]
            assert float(f.A[-1, -1] * f.G[0, 0]) > 1e-3


def test_split_is_exact_for_one_position_per_query() -> None:
    """One position per query: the deviations vanish and the mean part is
    ``E[x̄ x̄ᵀ] ⊗ E[g gᵀ]`` with ``g = ∇b_n`` (brute force); for one query
    that is the exact block."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**20, ()).item()))
    model = QueryRanker("linear").double()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    cmask = torch.ones(6, 5, dtype=torch.bool)
    batch = RankerBatch({"x": x}, cmask, random_labels(cmask, g))
    state = estimate_curvature(model, [batch], kinds=("kfac",), exact_max_params=0)
    grads = per_example_grads(model, [batch])
    sp = state.split["l1"]
    xbar = torch.cat([x, torch.ones(6, 1, dtype=x.dtype)], 1)
    gb = torch.stack([gr["l1.bias"] for gr in grads])
    assert rel(sp.A_mean, xbar.T @ xbar / 6) < BRUTE
    assert rel(sp.G_mean, gb.T @ gb / 6) < BRUTE
    assert float(sp.A_dev.abs().max()) < 1e-14 and float(sp.G_dev.abs().max()) < 1e-14
    one = RankerBatch({"x": x[:1]}, cmask[:1], batch.labels[:1])
    s1 = estimate_curvature(model, [one], kinds=("kfac",), exact_max_params=0).split["l1"]
    v = vec(wbar(per_example_grads(model, [one])[0], "l1"))
    block = torch.kron(s1.A_mean, s1.G_mean) + torch.kron(s1.A_dev, s1.G_dev)
    assert rel(block, torch.outer(v, v)) < EXACT


@pytest.mark.parametrize("case", ["mlp", "cross", "token"])
def test_expand_factors_are_the_old_rule(case: str) -> None:
    """``kfac`` still holds the expand rule, now assembled from the split
    sums: ``A = Σ_t x̄ x̄ᵀ / P``, ``G = Σ_t g gᵀ / N``, from inputs and output
    gradients recorded here with plain hooks (no estimator code)."""
    model, batches = _cases(11)[case]
    state = estimate_curvature(model, batches, kinds=("kfac",))
    names = [k for k, i in state.layers.items() if i.rule == "linear"]
    xs: dict[str, list] = {k: [] for k in names}
    gs: dict[str, list] = {k: [] for k in names}
    n = 0
    outs: dict[str, torch.Tensor] = {}
    for batch in batches:
        layouts = model.token_layouts(batch)

        def hook(k: str):
            def record(module, args, output) -> None:
                xs[k].append(args[0].detach())
                outs[k] = output

            return record

        hooks = [model.get_submodule(k).register_forward_hook(hook(k)) for k in names]
        loss = ranking_loss(model(batch), batch.candidate_mask, batch.labels, "sum")
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[k] for k in names])
        for k, gr in zip(names, grads, strict=True):
            lay = layouts[k]
            keep = lay.mask.reshape(-1).bool()
            x = xs[k].pop()
            x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)
            xs[k].append(x.reshape(-1, x.shape[-1])[keep])
            gs[k].append(gr.reshape(-1, gr.shape[-1])[keep])
        n += batch.size
    for k in names:
        x, gr = torch.cat(xs[k]), torch.cat(gs[k])
        assert rel(state.kfac[k].A, x.T @ x / x.shape[0]) < BRUTE, (case, k)
        assert rel(state.kfac[k].G, gr.T @ gr / n) < BRUTE, (case, k)


def _as_format_1(path, out) -> None:
    """Rewrite a format-2 file as format 1 wrote it: no split/exact tensors
    or metadata, ``format_version = "1"``, checksum recomputed."""
    tensors, meta = _io.read(path, "task")
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("split/", "exact/"))}
    meta = {k: v for k, v in meta.items() if k not in ("split", "exact", "sha256", "format")}
    meta.pop("format_version")
    import kronlink.curvature._io as io_mod

    old = io_mod.FORMAT_VERSION
    io_mod.FORMAT_VERSION = 1
    try:
        _io.write(out, tensors, meta)
    finally:
        io_mod.FORMAT_VERSION = old


def test_format_1_states_load_and_keep_the_expand_rule(tmp_path) -> None:
    model, batches = _cases(13)["cross"]
    state = estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag"))
    task = TaskState.from_model(model, state)
    task.save(tmp_path / "v2.safetensors", dtype=torch.float64)
    back = TaskState.load(tmp_path / "v2.safetensors")
    assert set(back.curvature.split) == set(state.split) and set(back.curvature.exact)
    for name, f in state.exact.items():
        assert torch.equal(back.curvature.exact[name], f)
    _as_format_1(tmp_path / "v2.safetensors", tmp_path / "v1.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v1.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1" and "split" not in f.metadata()
    old = TaskState.load(tmp_path / "v1.safetensors", model=model)
    assert old.curvature.split == {} and old.curvature.exact == {}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for new, expand in (("kfc", "kfc-expand"), ("ekfac", "ekfac-expand")):
        on_old = build_penalty(new, [old], 1.0).per_task(model)[0]
        want = build_penalty(expand, [task], 1.0).per_task(model)[0]
        assert on_old == pytest.approx(want, rel=1e-12)
        assert build_penalty(new, [task], 1.0).per_task(model)[0] != pytest.approx(want)
    assert json.loads(_io.read(tmp_path / "v2.safetensors", "task")[1]["split"])


def test_omega_is_half_the_fisher_quadratic_and_the_loss_rise() -> None:
    """At a point where every query's scores are equal and each query is
    repeated once with every label, the empirical Fisher is the Hessian of
    the mean loss exactly (the residuals ``C p - 1`` vanish) and the gradient
    is 0. Then the forecast (``predicted_forgetting``, from exact blocks) must
    be ``½ Δᵀ H Δ`` with H from autograd, and match the measured loss rise
    for a small Δ up to third-order terms."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**20, ()).item()))
    torch.manual_seed(0)
    model = MLPRanker().double()
    with torch.no_grad():
        model.net.l2.weight.zero_()  # equal scores within each query
    b, c = 5, 4
    x = torch.randn(b, c, 5, generator=g, dtype=torch.float64)
    xr = x.repeat_interleave(c, 0)  # query i once per label
    cmask = torch.ones(b * c, c, dtype=torch.bool)
    labels = torch.arange(c).repeat(b)
    batch = RankerBatch({"x": xr}, cmask, labels)
    state = estimate_curvature(model, [batch], kinds=("kfac",))
    assert set(state.exact) == {"net.l1", "net.l2"}  # 24 and 5 parameters
    prior = TaskState.from_model(model, state)
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone() for p in model.parameters()]

    def mean_loss(*theta: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, theta, strict=True)), (batch,))
        return ranking_loss(out, cmask, labels, "mean")

    grad0 = torch.autograd.grad(mean_loss(*[t.requires_grad_() for t in theta0]), theta0)
    assert max(float(t.abs().max()) for t in grad0) < 1e-15
    direction = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta0]
    theta0 = [t.detach() for t in theta0]
    _, hvp = torch.autograd.functional.hvp(mean_loss, tuple(theta0), tuple(direction))
    quad = 0.5 * sum(float((d * h).sum()) for d, h in zip(direction, hvp, strict=True))
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            for p, t, d in zip(model.parameters(), theta0, direction, strict=True):
                p.copy_(t + eps * d)
        forecast = predicted_forgetting(model, [prior])[0]
        assert forecast == pytest.approx(eps**2 * quad, rel=1e-10)
        rise = float(mean_loss(*[p.detach() for p in model.parameters()]) - mean_loss(*theta0))
        # third-order remainder: relative error O(eps)
        assert abs(forecast / rise - 1.0) < 20 * eps, (eps, forecast, rise)
