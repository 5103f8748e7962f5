"""Figure 2's dense matrices and relative errors against brute force on fresh
random inputs; the full Fisher against the estimator's diagonal on a real
(tiny) CNN ranker. (KFAC's exactness for one example at one position is
tested in tests/curvature.)"""

from __future__ import annotations

import torch

from kronlink.curvature import estimate_curvature
from kronlink.data.schema import Candidate, Query
from kronlink.experiments.fisher_figure import (
    diag_dense,
    ekfac_dense,
    full_fisher,
    kfac_dense,
    last_linear_layers,
    relative_error,
    vec_col,
)
from kronlink.models import build_ranker

D = torch.float64


def test_relative_error_is_the_frobenius_ratio() -> None:
    g = torch.Generator().manual_seed(11)
    for n in (1, 3, 7):
        full = torch.randn(n, n, generator=g, dtype=D)
        approx = full + 0.1 * torch.randn(n, n, generator=g, dtype=D)
        num = sum(float(approx[i, j] - full[i, j]) ** 2 for i in range(n) for j in range(n))
        den = sum(float(full[i, j]) ** 2 for i in range(n) for j in range(n))
        assert abs(relative_error(approx, full) - (num / den) ** 0.5) < 1e-12
    assert relative_error(full, full) == 0.0
    assert abs(relative_error(torch.zeros_like(full), full) - 1.0) < 1e-15


def test_dense_kfac_uses_column_stacking() -> None:
    g = torch.Generator().manual_seed(12)
    q, p = 3, 4
    x = torch.randn(p, generator=g, dtype=D)
    gr = torch.randn(q, generator=g, dtype=D)
    grad = torch.outer(gr, x)  # ∇W = g xᵀ, one example at one position
    v = torch.tensor([grad[i, j] for j in range(p) for i in range(q)], dtype=D)  # columns first
    assert torch.equal(vec_col(grad), v)
    exact = torch.outer(v, v)
    assert torch.allclose(kfac_dense(torch.outer(x, x), torch.outer(gr, gr)), exact, atol=1e-14)


def test_dense_ekfac_and_diagonal() -> None:
    g = torch.Generator().manual_seed(13)
    q, p, n = 2, 3, 50
    grads = torch.randn(n, q, p, generator=g, dtype=D)
    UA = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=D))[0]
    UG = torch.linalg.qr(torch.randn(q, q, generator=g, dtype=D))[0]
    s = torch.stack([(UG.T @ m @ UA) ** 2 for m in grads]).mean(0)
    dense = ekfac_dense(UA, UG, s)
    F = torch.stack([torch.outer(vec_col(m), vec_col(m)) for m in grads]).mean(0)
    U = torch.kron(UA, UG)
    # EKFAC keeps exactly the diagonal of F in the eigenbasis U (George et al. 2018).
    assert torch.allclose(torch.diag(U.T @ dense @ U), torch.diag(U.T @ F @ U), atol=1e-12)
    w, b = torch.rand(q, p - 1, generator=g, dtype=D), torch.rand(q, generator=g, dtype=D)
    d = diag_dense(w, b)
    assert torch.equal(torch.diag(d)[: q * (p - 1)], w.T.reshape(-1))
    assert torch.equal(torch.diag(d)[q * (p - 1) :], b)


def _queries(n: int) -> list[Query]:
    words = ["renal", "cyst", "liver", "heart", "valve", "lung", "bone", "skin"]
    out = []
    for i in range(n):
        cands = tuple(Candidate(f"C{j}", f"{words[j]} {words[(j + i) % 8]}") for j in range(4))
        out.append(Query(mention=f"{words[i % 8]} disease {i}", gold=f"C{i % 4}", candidates=cands))
    return out


def test_full_fisher_diagonal_matches_the_estimator() -> None:
    torch.manual_seed(0)
    model = build_ranker(
        "cnn", tokenizer=None, embedding_dim=6, channels=6, hidden_size=6, dropout=0.0
    ).double()
    queries = _queries(12)
    layers = last_linear_layers(model)
    assert layers == ["head.4", "head.6"]
    full = full_fisher(model, queries, layers)
    assert full.shape == (121, 121)
    state = estimate_curvature(
        model, [model.encode(queries[:5]), model.encode(queries[5:])], kinds=("diag",)
    )
    expected = torch.cat(
        [torch.diag(diag_dense(state.diag[f"{n}.weight"], state.diag[f"{n}.bias"])) for n in layers]
    )
    assert torch.allclose(torch.diag(full), expected, rtol=1e-10, atol=1e-14)


def test_omega_by_layer_adds_up_to_the_penalty() -> None:
    from kronlink.curvature import TaskState
    from kronlink.experiments.analysis import layer_group, omega_by_layer
    from kronlink.penalties import build_penalty

    torch.manual_seed(1)
    model = build_ranker(
        "cnn", tokenizer=None, embedding_dim=6, channels=6, hidden_size=6, dropout=0.0
    ).double()
    queries = _queries(10)
    batches = [model.encode(queries)]
    kinds = ("kfac", "ekfac", "diag")
    # Without exact blocks the four equal-shape convolutions share one
    # batched KFC term: the split by layer must still name each of them.
    priors = [
        TaskState.from_model(model, estimate_curvature(model, batches, kinds=kinds)),
        TaskState.from_model(
            model, estimate_curvature(model, batches, kinds=kinds, exact_max_params=0)
        ),
    ]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for prior in priors:
        parts = omega_by_layer(model, prior)
        assert set(parts) == {"kfc", "ekfac", "ewc"}
        assert set(prior.curvature.kfac) <= set(parts["kfc"])
        for method, by_layer in parts.items():
            total = build_penalty(method, [prior], 1.0).per_task(model)[0]
            assert abs(sum(by_layer.values()) - total) <= 1e-10 * abs(total)
    assert {layer_group(m) for m in parts["kfc"]} == {
        "embedding",
        "query_convs",
        "name_convs",
        "head",
    }
    assert layer_group("encoder.encoder.layer.2.attention.self.query") == "encoder layer 2"
