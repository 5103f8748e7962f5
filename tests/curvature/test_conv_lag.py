"""A Conv1d's split-rule sums from lagged products of its input
(``conv1d_lag_sums``) against the same sums over its explicit patches
(``split_sums``), in float64 on fresh random inputs: masks with holes (not
only padding at the end), kernels 1 to 5, every padding mode, with and
without bias, queries with no real position; and the whole estimator on
convolutions the lagged path does not take (stride, dilation)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from kronlink.curvature import estimate_curvature
from kronlink.curvature import factors as fx
from kronlink.models.base import RankerBatch, TokenLayout


def _explicit(module: nn.Conv1d, x: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor, b: int):
    patches = fx.conv1d_patches(module, x)[keep].reshape(int(keep.sum()), -1)
    if module.bias is not None:
        patches = fx.augment(patches)
    example = rows[:, None].expand_as(keep)[keep]
    g = torch.randn(patches.shape[0], module.out_channels, dtype=x.dtype)
    return fx.split_sums(patches, g, example, b)


# even kernels with "same" padding: PyTorch pads the extra zero on the right
CASES = list(itertools.product([1, 2, 3, 5], [0, 1, 2, "same", "valid"], [True, False]))


@pytest.mark.parametrize(("k", "padding", "bias"), CASES)
def test_lagged_sums_equal_the_patches_sums(k: int, padding, bias: bool) -> None:
    seed = int(torch.randint(0, 2**20, ()).item())  # fresh inputs each run
    g = torch.Generator().manual_seed(seed)
    n, c, t, b = 7, 3, 9, 4
    module = nn.Conv1d(c, 2, k, padding=padding, bias=bias).double()
    # an offset: the means dominate, as after a ReLU
    x = torch.randn(n, c, t, generator=g, dtype=torch.float64) + 3.0
    t_out = module(x).shape[2]
    keep = torch.rand(n, t_out, generator=g) < 0.6  # holes anywhere
    keep[0] = False  # a row with no real position
    rows = torch.randint(0, b - 1, (n,), generator=g)  # query b-1 has no row
    want = _explicit(module, x, keep, rows, b)
    work = fx.Workspace()
    for _ in range(2):  # the second call reuses the workspace
        got = fx.conv1d_lag_sums(fx.ConvInput(module, x, keep, rows), b, work)
        scale = want["a_dev"].abs().max()
        assert (got["a_dev"] - want["a_dev"]).abs().max() <= 1e-12 * scale, (seed, k, padding)
        for w, h in zip(want["a_rows"], got["a_rows"], strict=True):
            assert w.shape == h.shape
            assert torch.allclose(w, h, rtol=1e-12, atol=1e-12), (seed, k, padding)


def test_workspace_serves_larger_then_smaller_inputs() -> None:
    module = nn.Conv1d(4, 3, 3, padding=1).double()
    work = fx.Workspace()
    for n, t in [(3, 5), (8, 11), (2, 4), (8, 11)]:
        x = torch.randn(n, 4, t, dtype=torch.float64)
        keep = torch.rand(n, t) < 0.7
        rows = torch.arange(n) % 2
        want = _explicit(module, x, keep, rows, 2)
        got = fx.conv1d_lag_sums(fx.ConvInput(module, x, keep, rows), 2, work)
        assert torch.allclose(got["a_dev"], want["a_dev"], rtol=1e-12, atol=1e-12), (n, t)


class _Strided(nn.Module):
    """Conv1d with stride or dilation (the patches path), then a head."""

    def __init__(self, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=stride, dilation=dilation, padding=2)
        self.head = nn.Linear(4, 1)

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        x = batch.features["x"]  # (B, C, 3, T)
        b, cands = x.shape[:2]
        h = torch.relu(self.conv(x.reshape(b * cands, 3, -1))).mean(2)
        return self.head(h).reshape(b, cands)

    def token_layouts(self, batch: RankerBatch) -> dict:
        b, cands = batch.features["x"].shape[:2]
        t_out = self.conv(batch.features["x"].reshape(b * cands, 3, -1)).shape[2]
        example = torch.arange(b).repeat_interleave(cands)
        return {
            "conv": TokenLayout(torch.ones(b * cands, t_out, dtype=torch.bool), example),
            "head": TokenLayout(torch.ones(b * cands, 1, dtype=torch.bool), example),
        }


@pytest.mark.parametrize(("stride", "dilation"), [(2, 1), (1, 2)])
def test_strided_and_dilated_convolutions_take_the_patches_path(stride, dilation) -> None:
    torch.manual_seed(int(torch.randint(0, 2**20, ()).item()))
    model = _Strided(stride, dilation).double()
    assert not fx.ConvInput.supports(model.conv)
    x = torch.randn(3, 2, 3, 8, dtype=torch.float64)
    batch = RankerBatch({"x": x}, torch.ones(3, 2, dtype=torch.bool), torch.tensor([0, 1, 0]))
    state = estimate_curvature(model, [batch], kinds=("kfac",), exact_max_params=0)
    # Σ_t x̄ x̄ᵀ / positions over the explicit patches, every position real
    patches = fx.conv1d_patches(model.conv, x.reshape(6, 3, 8))
    patches = fx.augment(patches.reshape(-1, 9))
    want = patches.T @ patches / patches.shape[0]
    assert torch.allclose(state.kfac["conv"].A, want, rtol=1e-10, atol=1e-12)


def test_chunked_sums_equal_one_chunk(monkeypatch) -> None:
    module = nn.Conv1d(4, 3, 3, padding=1).double()
    x = torch.randn(6, 4, 10, dtype=torch.float64) + 1.0
    keep = torch.rand(6, 10) < 0.7
    rows = torch.arange(6) // 2
    want = _explicit(module, x, keep, rows, 3)
    monkeypatch.setattr(fx, "_PATCH_CHUNK", 5 * 12)  # five positions a chunk
    got = fx.conv1d_lag_sums(fx.ConvInput(module, x, keep, rows), 3, fx.Workspace())
    assert int(keep.sum()) > 5
    assert torch.allclose(got["a_dev"], want["a_dev"], rtol=1e-12, atol=1e-12)
    for w, h in zip(want["a_rows"], got["a_rows"], strict=True):
        assert torch.allclose(w, h, rtol=1e-12, atol=1e-12)
