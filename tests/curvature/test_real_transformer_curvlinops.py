"""KFAC of the real transformer ranker (tiny random BERT cross-encoder) against
curvlinops 3.0.1 ``KFACLinearOperator`` (``KFACType.EXPAND``,
``FisherType.EMPIRICAL``, ``separate_weight_and_bias=False``,
``CrossEntropyLoss(reduction="mean")``, one loss term per query,
``num_data`` = number of queries), run the way bench/_peers.py runs it: the
ranker wrapped so that one (B, 3, C, T) tensor is its input.

Only the batch of the first test has no padding: every query has the same
number of candidates and every row the same token length (one-word mentions
and names of fixed character lengths under the tiny character vocabulary).
curvlinops cannot mask padding, so its ``A`` averages padded tokens too, while
kronlink leaves them out; the second test shows that this difference is real.

Scale: the ranker flattens a batch of B queries with C candidates into
N = B*C rows before the encoder, so every Linear's input is (N, T, p) or
(N, p) and curvlinops takes N, not B, as the batch size. With ``num_data=B``
its ``A`` is C x ours (a sum over N*T positions divided by B*T) and its ``G``
C² x ours (the mean-reduction correction N² / num_data on gradients scaled
by 1/B), so its ``A ⊗ G`` is C³ x ours, for the head (input (N, p)) too.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import Tensor, nn

import kronlink.models as models
from kronlink.curvature import estimate_curvature
from kronlink.data.schema import Candidate, Query
from kronlink.models.base import RankerBatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("curvlinops")

LIBRARY = 1e-5  # relative Frobenius error of A ⊗ G against curvlinops
B, C = 3, 4
TINY = {
    "encoder": None,
    "num_layers": 2,
    "max_length": 32,
    "tiny_hidden_size": 32,
    "tiny_num_heads": 2,
    "tiny_intermediate_size": 64,
}


def _ranker() -> models.Ranker:
    torch.manual_seed(0)
    return models.build_ranker("transformer", **TINY).double().eval()


def _queries() -> list[Query]:
    """B queries of C candidates; every row ``[CLS] [M] m m [/M] [SEP] n n n
    [SEP]`` (10 tokens): one-word mentions and names split into characters."""
    rng = random.Random(0)

    def word(k: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))

    queries = []
    for b in range(B):
        cands = tuple(Candidate(f"q{b}c{i}", word(3)) for i in range(C))
        gold = cands[rng.randrange(C)].id
        queries.append(Query(word(2), gold, candidates=cands))
    return queries


class _Packed(nn.Module):
    """``forward(X) -> (B, C)`` scores; X (B, 3, C, T) long: input ids,
    attention mask, token types (bench/_peers.py, all candidates real)."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, x: Tensor) -> Tensor:
        feats = {"input_ids": x[:, 0], "attention_mask": x[:, 1], "token_type_ids": x[:, 2]}
        n_batch, n_cand = x.shape[0], x.shape[2]
        cand = torch.ones(n_batch, n_cand, dtype=torch.bool, device=x.device)
        labels = torch.zeros(n_batch, dtype=torch.long, device=x.device)
        return self.ranker(RankerBatch(feats, cand, labels))


def _curvlinops(ranker: nn.Module, batch: RankerBatch) -> dict[str, tuple[Tensor, Tensor]]:
    """curvlinops' (A, G) per Linear, keyed by the ranker's module names."""
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    assert bool(batch.candidate_mask.all())
    packed = _Packed(ranker)
    linears = [name for name, m in packed.named_modules() if isinstance(m, nn.Linear)]
    params = [p for m in packed.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    f = batch.features
    x = torch.stack([f["input_ids"], f["attention_mask"], f["token_type_ids"]], dim=1)
    op = KFACLinearOperator(
        packed,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        [(x, batch.labels)],
        fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=batch.size,
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    return {
        name.removeprefix("ranker."): (op._input_covariances[name], op._gradient_covariances[name])
        for name in linears
    }


def kron_rel(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor) -> float:
    """||A1⊗G1 - A2⊗G2||_F / ||A2⊗G2||_F without forming either product:
    ||A1⊗G1 - A2⊗G2||² = ||A1||²||G1||² + ||A2||²||G2||² - 2 <A1,A2> <G1,G2>."""
    sq = (
        a1.square().sum() * g1.square().sum()
        + a2.square().sum() * g2.square().sum()
        - 2 * (a1 * a2).sum() * (g1 * g2).sum()
    )
    return float(sq.clamp_min(0).sqrt() / (a2.norm() * g2.norm()))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pad(batch: RankerBatch, extra: int, pad_id: int) -> RankerBatch:
    """The same batch with ``extra`` padding positions at the end of every row."""
    f = batch.features
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    feats = {
        k: torch.cat([v, v.new_full((*v.shape[:-1], extra), fill[k])], dim=-1) for k, v in f.items()
    }
    return RankerBatch(feats, batch.candidate_mask, batch.labels)


def test_kfac_matches_curvlinops_on_the_unpadded_transformer() -> None:
    ranker = _ranker()
    batch = ranker.encode(_queries())
    ids = batch.features["input_ids"]
    assert ids.shape == (B, C, 10) and bool(batch.features["attention_mask"].all())
    assert bool(batch.candidate_mask.all()) and len(set(batch.labels.tolist())) > 1

    ours = estimate_curvature(ranker, [batch], kinds=("kfac",)).kfac
    theirs = _curvlinops(ranker, batch)
    n_linear = sum(isinstance(m, nn.Linear) for m in ranker.modules())
    assert len(theirs) == n_linear == 2 * 6 + 1  # q, k, v, attention output, FFN x 2; head
    errors = {}
    for name, (a, g) in theirs.items():
        f = ours[name]
        assert f.A.shape == a.shape and f.G.shape == g.shape, name
        errors[name] = kron_rel(C**3 * f.A, f.G, a, g)
    assert max(errors.values()) < LIBRARY, errors


def test_padding_changes_curvlinops_a_but_not_kronlink() -> None:
    ranker = _ranker()
    batch = ranker.encode(_queries())
    padded = _pad(batch, 5, ranker.pieces.pad_id)
    assert not bool(padded.features["attention_mask"].all())

    # Padding is masked in attention and pooling: the scores do not move.
    with torch.no_grad():
        assert torch.allclose(ranker(padded), ranker(batch), rtol=0, atol=1e-12)
    ours = estimate_curvature(ranker, [batch], kinds=("kfac",)).kfac
    ours_padded = estimate_curvature(ranker, [padded], kinds=("kfac",)).kfac
    theirs = _curvlinops(ranker, batch)
    theirs_padded = _curvlinops(ranker, padded)
    for name, (a, g) in theirs_padded.items():
        assert rel(ours_padded[name].A, ours[name].A) < 1e-10, name
        assert rel(ours_padded[name].G, ours[name].G) < 1e-10, name
        # Padded positions get no gradient, so curvlinops' G is unchanged too ...
        assert rel(g, theirs[name][1]) < 1e-10, name
        if name == "head":  # the head sees pooled rows: no positions to pad
            assert rel(a, theirs[name][0]) < 1e-10
        else:  # ... but its A averages the padded tokens' inputs as well. Least
            # for attention.output.dense (about 4e-4 here; 0.1 to 0.5 elsewhere):
            # padded queries attend to the real keys, so their context vectors
            # look like the real ones.
            assert rel(a, theirs[name][0]) > 1e-4, name
