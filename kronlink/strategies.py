"""Continual-learning strategies beside the penalties, for the research harness.

- Learning-rate control (ULMFiT's discriminative fine-tuning, Howard & Ruder
  2018): the learning rate of layer l is that of layer l+1 times ``gamma``
  (< 1), so the layers nearest the input, which hold the most general
  features, move least.
- Experience replay: old queries mixed into every batch. It needs the old
  data, which the service never keeps, so it is for research runs only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from torch import nn

from kronlink.errors import ConfigError

__all__ = ["layer_depths", "lrc_param_groups", "replay_sample"]

_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Depth of every trainable parameter, 0 at the input.

    A model may say it itself (``model.layer_depths()``); otherwise: embeddings
    are 0, a parameter under ``layer.<i>.`` is i+1, convolutions are 1 and
    everything after them (heads) is one past the deepest layer found.
    """
    own = getattr(model, "layer_depths", None)
    if callable(own):
        return own()
    depths: dict[str, int | None] = {}
    deepest = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _LAYER_INDEX.search(name)
        if "embed" in name:
            d: int | None = 0
        elif m:
            d = int(m.group(1)) + 1
        elif "conv" in name:
            d = 1
        else:
            d = None  # the head: placed on top below
        if d is not None:
            deepest = max(deepest, d)
        depths[name] = d
    return {n: (deepest + 1 if d is None else d) for n, d in depths.items()}


def lrc_param_groups(gamma: float) -> Callable[[nn.Module, float], list[dict]]:
    """Optimizer groups where depth d gets ``lr * gamma ** (top - d)``."""
    if not 0 < gamma <= 1:
        raise ConfigError(f"learning-rate control: gamma must be in (0, 1], got {gamma}")

    def groups(model: nn.Module, lr: float) -> list[dict]:
        depths = layer_depths(model)
        top = max(depths.values(), default=0)
        params = dict(model.named_parameters())
        by_depth: dict[int, list[nn.Parameter]] = {}
        for name, d in depths.items():
            by_depth.setdefault(d, []).append(params[name])
        return [
            {"params": ps, "lr": lr * gamma ** (top - d), "depth": d}
            for d, ps in sorted(by_depth.items())
        ]

    return groups


def replay_sample(queries: Sequence, size: int, seed: int = 0) -> list:
    """A fixed random sample of an old task's training queries to replay."""
    if size <= 0:
        raise ConfigError(f"replay: sample size must be > 0, got {size}")
    picked = list(queries)
    random.Random(seed).shuffle(picked)
    return picked[:size]
