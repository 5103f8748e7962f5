"""What every ranker provides: the contract that training, evaluation and the
curvature estimator rely on.

A ranker scores each (query, candidate) pair of a batch; a softmax over a
query's real candidates gives the loss. Candidate counts vary per query, so a
batch carries ``candidate_mask`` and the loss masks padded candidates out
(``masked_log_softmax``) instead of trusting a padding score.

For curvature (DESIGN.md section 4) a ranker also says, for every Linear,
Conv1d, Embedding and LayerNorm module that sees more than one position per
row, which positions are real and which example each row belongs to
(``token_layouts``). Padding positions carry no gradient and must not dilute
the activation factor ``A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kronlink.data.schema import Query

# A finite fill for padded candidates: -inf gives NaN in softmax gradients of
# all-masked rows and in some curvature libraries (LESSONS.md).
MASK_FILL = -1e4


@dataclass
class RankerBatch:
    """Tensors for one batch of queries, each with its candidates.

    ``features`` holds the model-specific tensors (token ids, masks); the keys
    are the ranker's own. ``candidate_mask`` is (B, C) bool, True for a real
    candidate. ``labels`` is (B,) long, the gold candidate's index, -1 where
    the gold concept is not among the candidates (inference on BM25 output).
    """

    features: dict[str, Tensor]
    candidate_mask: Tensor
    labels: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.candidate_mask.shape[0])

    def to(self, device: torch.device | str) -> RankerBatch:
        return RankerBatch(
            features={k: v.to(device, non_blocking=True) for k, v in self.features.items()},
            candidate_mask=self.candidate_mask.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            meta=self.meta,
        )


@dataclass(frozen=True)
class TokenLayout:
    """Where the real positions of one module's input are.

    ``mask``: bool, the input's shape without its feature dimension (for a
    Linear on (N, T, p): (N, T); for Conv1d on (N, C_in, T_in): the output
    positions (N, T_out); for an Embedding on ids (N, T): (N, T)).
    ``example``: long, shape (N,), the batch example (query) each leading row
    belongs to; a cross-encoder flattens (B, C) pairs into N = B*C rows.
    """

    mask: Tensor
    example: Tensor


def masked_log_softmax(scores: Tensor, candidate_mask: Tensor) -> Tensor:
    """log softmax over the real candidates of each row; padded entries get 0
    probability and no gradient."""
    filled = scores.masked_fill(~candidate_mask, MASK_FILL)
    return torch.log_softmax(filled, dim=-1)


def ranking_loss(
    scores: Tensor, candidate_mask: Tensor, labels: Tensor, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of the gold candidate under a masked softmax.

    Rows whose label is -1 (gold not among candidates) are skipped. With
    ``reduction="sum"`` autograd gives per-example gradients unscaled, which the
    curvature estimator needs; ``"mean"`` is for training.
    """
    logp = masked_log_softmax(scores, candidate_mask)
    valid = labels >= 0
    picked = logp.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    nll = -(picked * valid)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


class Ranker(nn.Module):
    """Base class of the rankers. Subclasses set ``kind`` and implement the
    abstract methods; ``kronlink.models.load_ranker`` dispatches on ``kind``."""

    kind: str = ""
    config: Any

    def encode(self, queries: Sequence[Query]) -> RankerBatch:
        """Tokenize queries (each with candidates) into a batch on the CPU."""
        raise NotImplementedError

    def forward(self, batch: RankerBatch) -> Tensor:  # (B, C) scores
        raise NotImplementedError

    def batch_padding(self) -> dict[str, Any]:
        """Per feature of ``encode``, its ``kronlink.models.dataset.FeaturePadding``:
        what lets cached per-query tensors be batched exactly as ``encode``
        would batch them. Rankers that do not say fall back to ``encode``."""
        raise NotImplementedError

    def encoding_key(self) -> str:
        """What ``encode``'s output depends on besides the queries: the kind,
        the config and the vocabulary. Keys the tokenised-query cache."""
        pieces = getattr(self, "pieces", None)
        if pieces is None:
            raise NotImplementedError
        self.batch_padding()  # raises when the ranker cannot be cached
        return f"{self.kind}|{self.config!r}|{pieces.fingerprint()}"

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        """Per module name (as in ``named_modules``), the layout of its input
        positions for this batch. Every Linear, Conv1d, Embedding and LayerNorm
        of the model appears."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (never pickle)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
