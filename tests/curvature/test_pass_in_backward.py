"""The estimator reduces each layer inside the backward (issue 14: the pass
held every layer's input, output and output gradient for the whole batch).
The factors must not change:

- against the batch-at-once flow the estimator used before (every output's
  gradient from one ``torch.autograd.grad`` call, then the sums), run here
  through the same reductions, on models whose modules run once, twice per
  forward (a shared encoder, pooled) or feed nothing to the loss;
- against a file the previous code (commit 35b1bb4) wrote for the library's
  tiny rankers in float64 (``python tests/curvature/test_pass_in_backward.py
  --write PATH`` with that code on ``PYTHONPATH``);
- ``MeanSums`` (the split rule's mean parts, kept as rows until there are as
  many as the layer is wide) against the dense sums, folded or not.

curvlinops' factors on a tiny transformer are checked in
test_real_transformer_curvlinops.py, which runs the same estimator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from cv_models import MiniCrossEncoder, rows_example
from test_real_rankers import QUERIES, TINY  # the fixture file was written from these
from torch import Tensor, nn

import kronlink.curvature.estimate as est
import kronlink.models as models
from kronlink.curvature import estimate_curvature
from kronlink.curvature._hooks import recording
from kronlink.curvature._positions import grouped
from kronlink.models.base import Ranker, RankerBatch, TokenLayout, ranking_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURE = Path(__file__).parent / "data" / "factors_before_issue14.safetensors"


class TwiceRanker(Ranker):
    """``enc`` runs twice per forward (query tokens, then candidate tokens),
    ``aux`` runs and feeds nothing to the scores (zero output gradient)."""

    kind = "test-twice"

    def __init__(self, p: int = 5, d: int = 4) -> None:
        super().__init__()
        self.enc = nn.Linear(p, d)
        self.aux = nn.Linear(p, 2)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, batch: RankerBatch) -> Tensor:
        f = batch.features
        b, c, t, p = f["cand"].shape
        qm = f["q_mask"].unsqueeze(-1).to(f["query"].dtype)
        q = (torch.tanh(self.enc(f["query"])) * qm).sum(1) / qm.sum(1).clamp_min(1)  # (B, d)
        cm = f["c_mask"].reshape(b * c, t, 1).to(q.dtype)
        cand = torch.tanh(self.enc(f["cand"].reshape(b * c, t, p)))
        cand = (cand * cm).sum(1) / cm.sum(1).clamp_min(1)  # (B*C, d)
        self.aux(f["query"])
        pair = self.norm(cand.reshape(b, c, -1) * q[:, None, :])
        return self.head(pair).squeeze(-1)

    def token_layouts(self, batch: RankerBatch) -> dict:
        f = batch.features
        b, c, t, _ = f["cand"].shape
        real = batch.candidate_mask
        ex = rows_example(b, c)
        q_lay = TokenLayout(f["q_mask"], torch.arange(b))
        c_lay = TokenLayout((f["c_mask"] & real[:, :, None]).reshape(b * c, t), ex)
        return {
            "enc": [q_lay, c_lay],
            "aux": q_lay,
            # norm and head see (B, C, d): B rows of C positions
            "norm": TokenLayout(real, torch.arange(b)),
            "head": TokenLayout(real, torch.arange(b)),
        }


def _twice_batch(gen: torch.Generator, b: int = 3, c: int = 3) -> RankerBatch:
    q_mask = torch.rand(b, 4, generator=gen) < 0.7
    q_mask[:, 0] = True
    c_mask = torch.rand(b, c, 3, generator=gen) < 0.7
    c_mask[..., 0] = True
    cand_mask = torch.ones(b, c, dtype=torch.bool)
    cand_mask[0, -1] = False
    feats = {
        "query": torch.randn(b, 4, 5, generator=gen, dtype=torch.float64),
        "q_mask": q_mask,
        "cand": torch.randn(b, c, 3, 5, generator=gen, dtype=torch.float64),
        "c_mask": c_mask,
    }
    labels = torch.tensor([0, 2, -1])[:b]
    return RankerBatch(feats, cand_mask, labels)


def _cross_batch(gen: torch.Generator, b: int = 3, c: int = 4, t: int = 5) -> RankerBatch:
    ids = torch.randint(1, 11, (b, c, t), generator=gen)
    tok = torch.rand(b, c, t, generator=gen) < 0.7
    tok[..., 0] = True
    ids = ids.masked_fill(~tok, 0)
    cand = torch.ones(b, c, dtype=torch.bool)
    cand[1, -1] = False
    labels = torch.randint(0, c - 1, (b,), generator=gen)
    return RankerBatch({"ids": ids, "tok_mask": tok}, cand, labels)


def _batch_at_once(
    model, batches, accs, fisher, device, generator, reduce, dtype, kronecker_only=False
):
    """The previous flow: record every call, ask autograd for all outputs'
    gradients at once, then reduce module by module."""
    watched = {n: a.module for n, a in accs.items() if a.info.kronecker or not kronecker_only}
    for batch in batches:
        batch = batch.to(device)
        with torch.enable_grad():
            with recording(watched) as rec:
                scores = model(batch)
            layouts = model.token_layouts(batch)
            labels = est._labels(scores.detach(), batch, fisher, generator)
            valid = (labels >= 0) & batch.candidate_mask.any(dim=1)
            if rec.calls and bool(valid.any()):
                loss = ranking_loss(scores, batch.candidate_mask, labels, reduction="sum")
                outs = [c.output for c in rec.calls]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
                grads = [
                    torch.zeros_like(o) if g is None else g
                    for o, g in zip(outs, grads, strict=True)
                ]
                cache: dict = {}
                for name, pos in grouped(accs, rec.calls, grads, layouts, valid, dtype):
                    reduce(name, pos, int(valid.shape[0]), cache)
        yield valid


def _tensors(state) -> dict[str, Tensor]:
    return state.tensors(torch.float64)


@pytest.mark.parametrize("case", ["cross", "twice"])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_in_backward_equals_batch_at_once(case: str, fisher: str, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if case == "cross":
        model = MiniCrossEncoder().double()
        batches = [_cross_batch(gen) for _ in range(3)]
    else:
        model = TwiceRanker().double()
        batches = [_twice_batch(gen) for _ in range(3)]
    kinds = ("kfac", "ekfac", "diag")

    def run() -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(5)
        return _tensors(estimate_curvature(model, batches, kinds=kinds, fisher=fisher, generator=g))

    ours = run()
    with monkeypatch.context() as m:
        m.setattr(est, "_passes", _batch_at_once)
        before = run()
    assert ours.keys() == before.keys()
    assert any(k.startswith("split/") for k in ours) and any(k.startswith("exact/") for k in ours)
    for k in ours:
        if k.startswith("ekfac/"):
            continue  # eigenbases of equal factors may differ in sign; s below
        torch.testing.assert_close(ours[k], before[k], rtol=1e-12, atol=1e-14, msg=k)
    # EKFAC's scalings in the eigenbasis: compare U diag(s) Uᵀ-invariant sums.
    for k in ours:
        if k.endswith("/s"):
            torch.testing.assert_close(ours[k].sum(), before[k].sum(), rtol=1e-9, atol=1e-14)
    if case == "twice":
        # the module that feeds nothing to the loss has zero G, not a missing one
        assert float(ours["kfac/aux/G"].abs().max()) == 0.0
        assert float(ours["kfac/enc/G"].abs().max()) > 0.0


def _real_states() -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for kind, cfg in TINY.items():
        torch.manual_seed(0)
        model = models.build_ranker(kind, **cfg).double().eval()
        batches = [model.encode(QUERIES[:2]), model.encode(QUERIES[1:])]
        state = estimate_curvature(model, batches, kinds=("kfac", "diag"), exact_max_params=128)
        for k, v in state.tensors(torch.float64).items():
            out[f"{kind}/{k}"] = v.contiguous()
    return out


def test_factors_equal_the_previous_code_on_the_tiny_rankers() -> None:
    from safetensors.torch import load_file

    before = load_file(str(FIXTURE))
    ours = _real_states()
    assert ours.keys() == before.keys()
    assert sum(k.split("/")[1] == "split" for k in ours) >= 10
    for k in ours:
        torch.testing.assert_close(ours[k], before[k], rtol=1e-10, atol=1e-14, msg=k)


@pytest.mark.parametrize("rows", [[2, 3], [4, 5, 7, 1]])  # 5 rows: no fold; 17: folds
def test_mean_sums_equal_the_dense_sums(rows: list[int]) -> None:
    from kronlink.curvature.factors import MeanSums

    gen = torch.Generator().manual_seed(0)
    dim = 6
    ms = MeanSums(dim, dtype=torch.float64, device=torch.device("cpu"))
    red = torch.zeros(dim, dim, dtype=torch.float64)
    wm = torch.zeros_like(red)
    for n in rows:
        u = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        v = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        t = torch.randint(1, 9, (n,), generator=gen).double()
        ms.add(u, v, t)
        for i in range(n):
            red += torch.outer(u[i], u[i])
            wm += t[i] * torch.outer(v[i], v[i])
    assert (ms.red is not None) == (sum(rows) >= dim)
    got_red, got_wm = ms.result()
    torch.testing.assert_close(got_red, red, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_wm, wm, rtol=1e-12, atol=1e-12)


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:
    from safetensors.torch import save_file

    Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
    save_file(_real_states(), sys.argv[2])
