"""Other curvature libraries run on kronlink's rankers, for bench/curvature.py.

Each ``make_*`` takes a ranker (eval mode, on its device) and the benchmark's
batches, does every one-time setup (imports, wrappers, hooks, data loaders)
and returns ``Pass(covers, run)``: ``run()`` computes that library's Kronecker
factors over all the batches once and returns them (kept alive until the
memory reading). The conventions follow tests/curvature/test_libraries.py and
docs/curvature.md "Other libraries' conventions":

- curvlinops 3.0.1 ``KFACLinearOperator`` (``KFACType.EXPAND``,
  ``FisherType.EMPIRICAL``, ``separate_weight_and_bias=False``,
  ``CrossEntropyLoss(reduction="mean")``, one loss term per query) on the
  transformer's Linear layers only (it supports Linear and Conv2d). It cannot
  mask padding: its ``A`` also averages padded tokens.
- ASDL (asdfghjkl 0.1a5, ``import asdl``): empirical Fisher, ``SHAPE_KRON``,
  Embedding and LayerNorm ignored (its Embedding rule stores a dense V x V
  ``A``); tokens are folded into the batch.
- nngeometry 0.4 ``PMatKFAC`` with its hooks backend on ``log p(gold)``, on
  the CNN's Conv1d and Linear layers (it has no Embedding rule). It takes the
  gradient with respect to the loader's first tensor, which must be float: a
  zero dummy is added (times 0) to the Embedding's output so every covered
  layer lies between that input and the output.
- BackPACK 1.7.1 ``KFAC`` (one MC sample) needs a chain of modules with 2-D
  inputs. The CNN ranker's forward is not one (masking, pooling, pairing), and
  its head sees (B, C, features) pairs that a softmax couples per query: KFAC
  refuses 3-D inputs. ``make_backpack_head`` tries exactly that and reports the
  error; ``make_backpack_head_proxy`` runs the head alone on (B*C, features)
  rows with a per-candidate BCE loss (trunk forward under no_grad): the part
  BackPACK accepts, not the ranking loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kronlink.models.base import RankerBatch, masked_log_softmax


@dataclass
class Pass:
    covers: str
    run: Callable[[], Any]


def _count(model: nn.Module) -> str:
    kinds = (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm)
    n = {k.__name__: sum(isinstance(m, k) for m in model.modules()) for k in kinds}
    return ", ".join(f"{v} {k}" for k, v in n.items() if v)


# ---- the transformer, packed into one tensor for libraries that take X ----


def pack_transformer(batch: RankerBatch) -> Tensor:
    """(B, 4, C, T) long: input ids, attention mask, token types, candidate mask."""
    f = batch.features
    cand = batch.candidate_mask.long()[:, :, None].expand_as(f["input_ids"])
    return torch.stack([f["input_ids"], f["attention_mask"], f["token_type_ids"], cand], dim=1)


class PackedTransformer(nn.Module):
    """``forward(X) -> (B, C)`` scores of the wrapped ranker."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, x: Tensor) -> Tensor:
        feats = {"input_ids": x[:, 0], "attention_mask": x[:, 1], "token_type_ids": x[:, 2]}
        cand = x[:, 3, :, 0].bool()
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.ranker(RankerBatch(feats, cand, labels))


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def make_curvlinops(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:

    packed = PackedTransformer(ranker)
    linears = _linears(packed)
    data = [(pack_transformer(b), b.labels) for b in batches]
    return Pass(
        f"{len(linears)} Linear only (model: {_count(ranker)}); A includes padded tokens",
        _curvlinops_run(packed, linears, data, sum(b.size for b in batches)),
    )


def _curvlinops_run(
    model: nn.Module, linears: Sequence[nn.Linear], data: list, n: int, **extra: Any
) -> Callable[[], Any]:
    """curvlinops' empirical KFAC (expand) over ``linears``, as a timed pass."""
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    params = [p for m in linears for p in m.parameters() if p.requires_grad]

    def run() -> Any:
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="mean"),
            params,
            data,
            fisher_type=FisherType.EMPIRICAL,
            kfac_approx=KFACType.EXPAND,
            separate_weight_and_bias=False,
            check_deterministic=False,
            num_data=n,
            num_per_example_loss_terms=1,
            **extra,
        )
        op.compute_kronecker_factors()
        return op._input_covariances, op._gradient_covariances

    return run


def make_asdl(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:
    import torch.nn.functional as F
    from asdl import FISHER_EMP, FisherConfig, get_fisher_maker
    from asdl.grad_maker import LOSS_CROSS_ENTROPY
    from asdl.matrices import SHAPE_KRON

    packed = PackedTransformer(ranker)
    data = [(pack_transformer(b), b.labels) for b in batches]
    config = FisherConfig(
        fisher_type=FISHER_EMP,
        fisher_shapes=[SHAPE_KRON],
        loss_type=LOSS_CROSS_ENTROPY,
        ignore_modules=[nn.Embedding, nn.LayerNorm],
        data_size=sum(b.size for b in batches),
    )
    maker = get_fisher_maker(packed, config)

    def run() -> Any:
        maker.zero_fisher()
        for x, y in data:
            dummy = maker.setup_model_call(packed, x)
            maker.setup_loss_call(F.cross_entropy, dummy, y)
            maker.forward_and_backward(accumulate=True)
        return [getattr(m, "fisher", None) for m in _linears(packed)]

    return Pass(
        f"{len(_linears(packed))} Linear only (model: {_count(ranker)}); tokens folded into "
        "the batch, padded tokens included",
        run,
    )


# ---- the CNN ----------------------------------------------------------------


def _cat(batches: Sequence[RankerBatch], key: str) -> Tensor:
    return torch.cat([b.features[key] for b in batches])


def make_nngeometry(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatKFAC

    lc = LayerCollection()
    n_layers = 0
    for m in ranker.modules():
        if isinstance(m, nn.Linear | nn.Conv1d):
            lc.add_layer_from_model(ranker, m)
            n_layers += 1
    # Batches are slices of one encoding (same widths), so they concatenate.
    device = batches[0].labels.device
    n = sum(b.size for b in batches)
    tensors = (
        torch.zeros(n, 1, device=device),  # the float "input" nngeometry differentiates by
        _cat(batches, "query_ids"),
        _cat(batches, "query_mask"),
        _cat(batches, "name_ids"),
        _cat(batches, "name_mask"),
        torch.cat([b.candidate_mask for b in batches]),
        torch.cat([b.labels for b in batches]),
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=batches[0].size
    )
    held: dict[str, Tensor] = {}
    ranker.embedding.register_forward_hook(lambda m, i, out: out + 0 * held["d"].sum())

    def log_p_gold(d, q_ids, q_mask, n_ids, n_mask, cand, y):
        held["d"] = d
        feats = {"query_ids": q_ids, "query_mask": q_mask, "name_ids": n_ids, "name_mask": n_mask}
        scores = ranker(RankerBatch(feats, cand, y))
        return masked_log_softmax(scores, cand).gather(1, y[:, None])

    def run() -> Any:
        gen = TorchHooksJacobianBackend(layer_collection=lc, model=ranker, function=log_p_gold)
        return PMatKFAC(generator=gen, examples=loader).data

    return Pass(
        f"{n_layers} Conv1d+Linear (model: {_count(ranker)}); no Embedding rule; "
        "rows of a query's candidates counted as samples",
        run,
    )


class DictRanker(nn.Module):
    """``forward(X) -> (B, C)`` scores, X a dict of the ranker's features and
    the candidate mask (curvlinops takes dict inputs with a ``batch_size_fn``)."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, x: dict) -> Tensor:
        feats = {k: v for k, v in x.items() if k != "candidate_mask"}
        cand = x["candidate_mask"]
        labels = torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device)
        return self.ranker(RankerBatch(feats, cand, labels))


def make_curvlinops_cnn(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:
    """curvlinops on the CNN's Linear layers (it has no Conv1d or Embedding
    rule), same options as ``make_curvlinops``; the head's (B, C, F) input
    counts C positions per query (expand)."""

    wrapped = DictRanker(ranker)
    linears = _linears(wrapped)
    data = [({**b.features, "candidate_mask": b.candidate_mask}, b.labels) for b in batches]
    run = _curvlinops_run(
        wrapped,
        linears,
        data,
        sum(b.size for b in batches),
        batch_size_fn=lambda x: x["candidate_mask"].shape[0],
    )
    return Pass(f"{len(linears)} Linear only (model: {_count(ranker)})", run)


def _pair_features(ranker: nn.Module, batch: RankerBatch) -> Tensor:
    """The CNN ranker's forward up to the head's input: (B, C, 4 * channels)."""
    from kronlink.models.cnn import _stack

    f = batch.features
    q_ids, q_mask = f["query_ids"], f["query_mask"]
    b, c, w = f["name_ids"].shape
    c_ids, c_mask = f["name_ids"].reshape(b * c, w), f["name_mask"].reshape(b * c, w)
    emb = ranker.embedding(_stack(q_ids, c_ids, ranker.pieces.pad_id))
    q = ranker._encode(emb[:b, : q_ids.shape[1]], q_mask, ranker.query_convs)
    cv = ranker._encode(emb[b:, :w], c_mask, ranker.name_convs)
    q = q.repeat_interleave(c, dim=0)
    return torch.cat([q, cv, q * cv, (q - cv).abs()], dim=-1).view(b, c, -1)


def make_backpack_head(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:
    """BackPACK KFAC on the head as the ranker uses it: (B, C, F) pairs, a
    softmax over each query's candidates. Expected to raise."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC

    head = extend(nn.Sequential(*ranker.head, nn.Flatten(1)))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> Any:
        for b in batches:
            with torch.no_grad():
                x = _pair_features(ranker, b)
            with backpack(KFAC()):
                loss_fn(head(x), b.labels).backward()
        return [p.kfac for p in head.parameters()]

    return Pass("head Linears on (B, C, F) pairs, ranking softmax", run)


def make_backpack_head_proxy(ranker: nn.Module, batches: Sequence[RankerBatch]) -> Pass:
    from backpack import backpack, extend
    from backpack.extensions import KFAC

    head = extend(ranker.head)
    loss_fn = extend(nn.BCEWithLogitsLoss(reduction="sum"))
    n_lin = len(_linears(head))

    def run() -> Any:
        for b in batches:
            with torch.no_grad():
                x = _pair_features(ranker, b)
            x = x.reshape(-1, x.shape[-1])
            target = nn.functional.one_hot(b.labels, b.candidate_mask.shape[1]).reshape(-1, 1)
            with backpack(KFAC()):
                loss_fn(head(x), target.to(x.dtype)).backward()
        return [p.kfac for p in head.parameters()]

    return Pass(
        f"{n_lin} head Linear only (model: {_count(ranker)}); per-candidate BCE proxy on "
        "(B*C, F) rows, trunk forward without grad; 1 MC sample",
        run,
    )


PEERS: dict[str, dict[str, Callable[[nn.Module, Sequence[RankerBatch]], Pass]]] = {
    "transformer": {"curvlinops KFAC": make_curvlinops, "ASDL KFAC": make_asdl},
    "cnn": {
        "curvlinops KFAC": make_curvlinops_cnn,
        "nngeometry PMatKFAC": make_nngeometry,
        "BackPACK KFAC (ranking head)": make_backpack_head,
        "BackPACK KFAC (head proxy)": make_backpack_head_proxy,
    },
}
