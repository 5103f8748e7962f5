"""The rankers: a BERT cross-encoder and a CNN (DESIGN.md section 3).

    build_ranker("transformer", num_layers=3)   # pretrained MiniLM layers
    build_ranker("cnn", tokenizer=None)         # tiny character vocabulary
    ranker.save(folder); load_ranker(folder)

A saved ranker is one self-contained folder (config.json, model.safetensors,
tokenizer.json); loading it reads no package folder and no hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kronlink.errors import CheckpointError, ConfigError
from kronlink.models._checkpoint import config_from_dict, read_config
from kronlink.models.base import (
    MASK_FILL,
    Ranker,
    RankerBatch,
    TokenLayout,
    masked_log_softmax,
    ranking_loss,
)
from kronlink.models.cnn import CNNRanker, CNNRankerConfig
from kronlink.models.transformer import TransformerRanker, TransformerRankerConfig

__all__ = [
    "MASK_FILL",
    "RANKERS",
    "CNNRanker",
    "CNNRankerConfig",
    "Ranker",
    "RankerBatch",
    "TokenLayout",
    "TransformerRanker",
    "TransformerRankerConfig",
    "build_ranker",
    "load_ranker",
    "masked_log_softmax",
    "ranking_loss",
]

# kind -> (ranker class, config class)
RANKERS: dict[str, tuple[type[TransformerRanker] | type[CNNRanker], type[Any]]] = {
    TransformerRanker.kind: (TransformerRanker, TransformerRankerConfig),
    CNNRanker.kind: (CNNRanker, CNNRankerConfig),
}


def build_ranker(kind: str, **config_overrides: Any) -> Ranker:
    """A new ranker of ``kind`` ("transformer" or "cnn"); keyword arguments
    override its config's defaults (``encoder=None`` / ``tokenizer=None`` give
    tiny random models)."""
    if kind not in RANKERS:
        raise ConfigError(f"unknown ranker kind {kind!r}; expected one of {sorted(RANKERS)}")
    cls, config_cls = RANKERS[kind]
    return cls.build(config_from_dict(config_cls, config_overrides))


def load_ranker(directory: str | Path, map_location: str | torch.device = "cpu") -> Ranker:
    """A saved ranker, in eval mode on ``map_location``; CheckpointError when
    a file is missing or corrupt, the kind unknown or a shape mismatched."""
    kind = read_config(directory)["kind"]
    if not isinstance(kind, str) or kind not in RANKERS:
        raise CheckpointError(
            f"{Path(directory)}: unknown ranker kind {kind!r}; expected one of {sorted(RANKERS)}"
        )
    return RANKERS[kind][0].load(directory, map_location)
