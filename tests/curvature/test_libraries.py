"""Agreement with independent curvature libraries (products A ⊗ G, since
each library splits the scale between the factors its own way).

Conventions, for a ranker whose query n has C candidate rows of T positions:

- nngeometry 0.4 (``PMatKFAC``): treats every row of a Linear/Conv1d input as
  a sample of the query it came from, so ``A`` is summed over rows and divided
  by the number of queries, not rows: its ``A ⊗ G`` is C x ours. For Conv1d
  it divides ``G`` by the output positions and leaves ``A`` summed over them,
  which gives the same product as our "A mean over positions, G summed". Its
  ``FIM`` sums over all classes (true Fisher); the empirical Fisher is its
  hooks backend run on ``log p(gold)``.
- curvlinops 3.0.1 (``KFACLinearOperator``, ``KFACType.EXPAND``,
  ``FisherType.EMPIRICAL``, ``separate_weight_and_bias=False``): ``A`` is the
  mean of x̄x̄ᵀ over all weight-sharing positions (it cannot mask padding, so
  the test has none); with ``CrossEntropyLoss(reduction="mean")`` and one loss
  term per query, ``G`` is the mean over queries of Σ_t g gᵀ: equal to ours.
  With ``reduction="sum"`` its product would be N x ours (a summed Fisher).
- BackPACK 1.7.1 keeps the bias out of ``A`` (separate blocks) and fails on
  (batch, tokens, features) inputs; its ``BatchGrad`` per-row gradients,
  summed per query, check our diagonal Fisher instead.
"""

from __future__ import annotations

import torch
from cv_models import ConvNet, ConvRanker, MLPNet, MLPRanker, TokenRanker, conv_batch, mlp_batch
from torch import nn

from kronlink.curvature import estimate_curvature
from kronlink.models.base import RankerBatch

LIBRARY = 1e-5  # relative Frobenius error of A ⊗ G against a library


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _nngeometry_kfac(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatKFAC

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)

    def empirical(xb, yb):  # log p(gold): the per-query gradient of the empirical Fisher
        return torch.log_softmax(net(xb), -1).gather(1, yb[:, None])

    lc = LayerCollection.from_model(net)
    gen = TorchHooksJacobianBackend(layer_collection=lc, model=net, function=empirical)
    kfac = PMatKFAC(generator=gen, examples=loader)
    return {lid: torch.kron(a, g) for lid, (a, g) in kfac.data.items()}


def test_nngeometry_mlp_and_conv1d() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    c = 4
    cases = [
        (MLPRanker().double(), mlp_batch(10, c, 5, g, ragged=False)),
        (ConvRanker().double(), conv_batch(10, c, 3, 6, g, ragged=False)),
    ]
    for ranker, batch in cases:
        ours = estimate_curvature(ranker, [batch], kinds=("kfac",))
        net = ranker.net
        x = batch.features["x"]
        theirs = _nngeometry_kfac(net, x, batch.labels)
        assert len(theirs) == 2
        for lid, prod in theirs.items():
            f = ours.kfac[f"net.{lid}"]
            err = rel(c * torch.kron(f.A, f.G), prod)
            assert err < LIBRARY, (type(net).__name__, lid, err)
    assert isinstance(cases[1][0].net, ConvNet) and isinstance(cases[0][0].net, MLPNet)


def test_curvlinops_expand_on_token_shaped_inputs() -> None:
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    b, c, t, p = 12, 4, 5, 4
    ranker = TokenRanker(p=p).double()
    x = torch.randn(b, c, t, p, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    batch = RankerBatch({"x": x}, torch.ones(b, c, dtype=torch.bool), y)
    ours = estimate_curvature(ranker, [batch], kinds=("kfac",))
    net = ranker.net
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    op = KFACLinearOperator(
        net,
        nn.CrossEntropyLoss(reduction="mean"),
        list(net.parameters()),
        data,
        fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    for name in ("l1", "l2", "head"):
        a, gg = op._input_covariances[name], op._gradient_covariances[name]
        f = ours.kfac[f"net.{name}"]
        err = rel(torch.kron(f.A, f.G), torch.kron(a, gg))
        assert err < LIBRARY, (name, err)


def test_backpack_batchgrad_checks_the_diagonal() -> None:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    b, c = 8, 3
    ranker = MLPRanker().double()
    batch = mlp_batch(b, c, 5, g, ragged=False)
    ours = estimate_curvature(ranker, [batch], kinds=("diag",))
    net = extend(ranker.net)
    loss = nn.CrossEntropyLoss(reduction="sum")(net(batch.features["x"]), batch.labels)
    with backpack(BatchGrad()):
        loss.backward()
    for name, p in net.named_parameters():
        rows = p.grad_batch  # (B*C, ...): one gradient per row; sum the rows of a query
        per_query = rows.reshape(b, c, *p.shape).sum(1)
        err = rel(ours.diag[f"net.{name}"], per_query.square().mean(0))
        assert err < LIBRARY, (name, err)
