"""Tiny rankers that implement the ``Ranker`` contract, for curvature tests.

- ``QueryRanker``: one row and one position per query (exactness tests).
- ``MLPRanker``: candidate features (B, C, p) flattened to N = B*C rows.
- ``MiniCrossEncoder``: Embedding -> Linear on (N, T, d) -> LayerNorm ->
  masked mean -> Linear head, N = B*C rows of T tokens.
- ``ConvRanker``: Conv1d over (N, C_in, T) per candidate, masked mean, head.
- ``TokenRanker``: Linear layers on (B, C, T, p), the shape curvlinops sees.

Also ``word_queries`` (queries of random words with 2 to 5 candidates) and
``assert_same_value_and_grads`` (a penalty against its reference).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from kronlink.data.schema import Candidate, Query
from kronlink.models.base import Ranker, RankerBatch, TokenLayout

WORDS = "acute chronic fever left right femur renal failure type diabetes".split()


def word_queries(n: int, seed: int) -> list[Query]:
    """n queries of two random words, each with 2 to 5 candidates, gold first."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cands = tuple(
            Candidate(f"C{i}{j}", " ".join(rng.sample(WORDS, 3))) for j in range(rng.randint(2, 5))
        )
        out.append(Query(" ".join(rng.sample(WORDS, 2)), cands[0].id, candidates=cands))
    return out


def _dense(g: Tensor | None) -> Tensor | None:
    """A penalty's gradient on an embedding is sparse (its prior's rows only)."""
    return g.to_dense() if g is not None and g.is_sparse else g


def assert_same_value_and_grads(model: nn.Module, got: Tensor, want: Tensor, tol: float) -> None:
    """``got`` and ``want`` (scalars of ``model``'s parameters) agree to
    ``tol``, and so does every parameter's gradient of them."""
    params = list(model.parameters())
    got_grads = [_dense(g) for g in torch.autograd.grad(got, params, allow_unused=True)]
    want_grads = [_dense(g) for g in torch.autograd.grad(want, params, allow_unused=True)]
    assert abs(float(got.detach()) - float(want.detach())) <= tol * abs(float(want.detach()))
    # a parameter with (numerically) zero gradient: rounding noise only
    floor = 1e-12 * float(torch.cat([b.reshape(-1) for b in want_grads if b is not None]).norm())
    for (n, _), a, b in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0, n
            continue
        assert float((a.double() - b).norm()) <= tol * float(b.norm()) + floor, n


def rows_example(b: int, c: int, device=None) -> Tensor:
    return torch.arange(b, device=device).repeat_interleave(c)


class QueryRanker(Ranker):
    """features["x"]: (B, p) floats, (B, C_in, k) for conv, or (B,) ids."""

    kind = "test-query"

    def __init__(self, first: str, p: int = 4, q: int = 3, c: int = 5) -> None:
        super().__init__()
        self.first = first
        if first == "linear":
            self.l1 = nn.Linear(p, q)
        elif first == "conv":
            self.l1 = nn.Conv1d(2, q, kernel_size=3)
        elif first == "embedding":
            self.l1 = nn.Embedding(7, q)
        self.head = nn.Linear(q, c)

    def forward(self, batch: RankerBatch) -> Tensor:
        h = self.l1(batch.features["x"])
        if self.first == "conv":
            h = h.squeeze(-1)
        return self.head(torch.tanh(h))

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b = batch.size
        ex = torch.arange(b)
        mask = (
            torch.ones(b, 1, dtype=torch.bool)
            if self.first == "conv"
            else torch.ones(b, dtype=torch.bool)
        )
        return {
            "l1": TokenLayout(mask, ex),
            "head": TokenLayout(torch.ones(b, dtype=torch.bool), ex),
        }


class MLPNet(nn.Module):
    def __init__(self, p: int = 5, h: int = 4) -> None:
        super().__init__()
        self.l1 = nn.Linear(p, h)
        self.l2 = nn.Linear(h, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, p) -> (B, C)
        b, c, p = x.shape
        return self.l2(torch.tanh(self.l1(x.reshape(b * c, p)))).reshape(b, c)


class MLPRanker(Ranker):
    kind = "test-mlp"

    def __init__(self, p: int = 5, h: int = 4) -> None:
        super().__init__()
        self.net = MLPNet(p, h)

    def forward(self, batch: RankerBatch) -> Tensor:
        return self.net(batch.features["x"])

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b, c = batch.candidate_mask.shape
        lay = TokenLayout(batch.candidate_mask.reshape(b * c), rows_example(b, c))
        return {"net.l1": lay, "net.l2": lay}


class ConvNet(nn.Module):
    def __init__(self, c_in: int = 3, h: int = 4, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, h, kernel_size=k, padding=k // 2)
        self.head = nn.Linear(h, 1)

    def forward(self, x: Tensor, tok_mask: Tensor | None = None) -> Tensor:
        b, c, c_in, t = x.shape
        h = torch.tanh(self.conv(x.reshape(b * c, c_in, t)))  # (N, h, T)
        m = (
            torch.ones(b * c, t, dtype=h.dtype)
            if tok_mask is None
            else tok_mask.reshape(b * c, t).to(h.dtype)
        )
        pooled = (h * m[:, None, :]).sum(-1) / m.sum(-1, keepdim=True).clamp_min(1)
        return self.head(pooled).reshape(b, c)


class ConvRanker(Ranker):
    """features["x"]: (B, C, C_in, T), zero at padded tokens; "tok_mask"."""

    kind = "test-conv"

    def __init__(self, c_in: int = 3, h: int = 4, k: int = 3) -> None:
        super().__init__()
        self.net = ConvNet(c_in, h, k)

    def forward(self, batch: RankerBatch) -> Tensor:
        return self.net(batch.features["x"], batch.features["tok_mask"])

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b, c = batch.candidate_mask.shape
        tok = batch.features["tok_mask"] & batch.candidate_mask[:, :, None]
        ex = rows_example(b, c)
        # padding=k//2, stride 1: output position t is centred on input t.
        return {
            "net.conv": TokenLayout(tok.reshape(b * c, -1), ex),
            "net.head": TokenLayout(batch.candidate_mask.reshape(b * c), ex),
        }


class MiniCrossEncoder(Ranker):
    """features["ids"] (B, C, T) long (0 = pad), "tok_mask" (B, C, T) bool."""

    kind = "test-cross"

    def __init__(self, vocab: int = 11, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, batch: RankerBatch) -> Tensor:
        ids, tok = batch.features["ids"], batch.features["tok_mask"]
        b, c, t = ids.shape
        h = self.norm(torch.tanh(self.proj(self.emb(ids.reshape(b * c, t)))))
        m = tok.reshape(b * c, t, 1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(pooled).reshape(b, c)

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b, c = batch.candidate_mask.shape
        tok = (batch.features["tok_mask"] & batch.candidate_mask[:, :, None]).reshape(b * c, -1)
        ex = rows_example(b, c)
        lay = TokenLayout(tok, ex)
        return {
            "emb": lay,
            "proj": lay,
            "norm": lay,
            "head": TokenLayout(batch.candidate_mask.reshape(b * c), ex),
        }


class TokenNet(nn.Module):
    """Linear layers on (B, C, T, p): every (candidate, token) is a position."""

    def __init__(self, p: int = 4, h: int = 3) -> None:
        super().__init__()
        self.l1 = nn.Linear(p, h)
        self.l2 = nn.Linear(h, h)
        self.head = nn.Linear(h, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))  # (B, C, T, h)
        return self.head(h.mean(2)).squeeze(-1)  # (B, C)


class TokenRanker(Ranker):
    kind = "test-token"

    def __init__(self, p: int = 4, h: int = 3) -> None:
        super().__init__()
        self.net = TokenNet(p, h)

    def forward(self, batch: RankerBatch) -> Tensor:
        return self.net(batch.features["x"])

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        b, c, t, _ = batch.features["x"].shape
        ex = torch.arange(b)
        full = TokenLayout(torch.ones(b, c, t, dtype=torch.bool), ex)
        return {
            "net.l1": full,
            "net.l2": full,
            "net.head": TokenLayout(torch.ones(b, c, dtype=torch.bool), ex),
        }


def random_labels(mask: Tensor, g: torch.Generator) -> Tensor:
    """A real candidate per row, uniformly."""
    w = mask.to(torch.float64)
    return torch.multinomial(w, 1, generator=g).squeeze(1)


def cross_batch(
    b: int, c: int, t: int, vocab: int, g: torch.Generator, ragged: bool = True
) -> RankerBatch:
    ids = torch.randint(1, vocab, (b, c, t), generator=g)
    n_cand = torch.randint(2, c + 1, (b,), generator=g) if ragged else torch.full((b,), c)
    n_tok = torch.randint(1, t + 1, (b, c), generator=g) if ragged else torch.full((b, c), t)
    cmask = torch.arange(c)[None, :] < n_cand[:, None]
    tmask = torch.arange(t)[None, None, :] < n_tok[:, :, None]
    ids = torch.where(tmask, ids, torch.zeros_like(ids))
    labels = random_labels(cmask, g)
    return RankerBatch({"ids": ids, "tok_mask": tmask}, cmask, labels)


def conv_batch(
    b: int, c: int, c_in: int, t: int, g: torch.Generator, ragged: bool = True
) -> RankerBatch:
    x = torch.randn(b, c, c_in, t, generator=g, dtype=torch.float64)
    n_cand = torch.randint(2, c + 1, (b,), generator=g) if ragged else torch.full((b,), c)
    n_tok = torch.randint(1, t + 1, (b, c), generator=g) if ragged else torch.full((b, c), t)
    cmask = torch.arange(c)[None, :] < n_cand[:, None]
    tmask = torch.arange(t)[None, None, :] < n_tok[:, :, None]
    x = x * tmask[:, :, None, :]
    return RankerBatch({"x": x, "tok_mask": tmask}, cmask, random_labels(cmask, g))


def mlp_batch(b: int, c: int, p: int, g: torch.Generator, ragged: bool = True) -> RankerBatch:
    x = torch.randn(b, c, p, generator=g, dtype=torch.float64)
    n_cand = torch.randint(2, c + 1, (b,), generator=g) if ragged else torch.full((b,), c)
    cmask = torch.arange(c)[None, :] < n_cand[:, None]
    return RankerBatch({"x": x}, cmask, random_labels(cmask, g))
