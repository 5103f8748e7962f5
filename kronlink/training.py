"""Fine-tuning a ranker on one task, with an optional penalty on the loss.

The loop is plain PyTorch: AdamW with linear warm-up and decay, gradient
clipping, bf16 autocast on CUDA, a best-on-dev checkpoint kept in host memory
and restored at the end. Continual learning plugs in through three hooks:

- ``penalty(model) -> Tensor``: added to the task loss every step (KFC, EWC...).
- ``param_groups(model, lr) -> list[dict]``: optimizer groups, for
  learning-rate control (discriminative rates per layer).
- ``replay``: old queries mixed into every batch (experience replay; research
  only, it needs old data).

Progress goes to a callback (``on_progress``); the library never prints.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from kronlink.data.schema import Query
from kronlink.errors import ConfigError
from kronlink.evaluation import Metrics, evaluate
from kronlink.models.base import Ranker, ranking_loss
from kronlink.models.dataset import collate, encoded_queries, length_buckets

__all__ = ["Progress", "TrainConfig", "TrainResult", "pick_device", "seed_everything", "train"]

log = logging.getLogger(__name__)

Penalty = Callable[[nn.Module], Tensor]
ParamGroups = Callable[[nn.Module, float], list[dict]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16  # queries per step; each brings all its candidates
    lr: float = 1e-4  # AdamW; the CNN ranker wants about 1e-3
    # The scoring head starts random while the encoder is pretrained: at the
    # encoder's rate it takes hundreds of steps before the loss moves at all.
    head_lr: float | None = 3e-3  # rate of parameters under ``head.``; None: lr
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of steps with a linear warm-up
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    amp: bool = True  # bf16 autocast, CUDA only
    seed: int = 0
    eval_batch_size: int = 64
    evals_per_epoch: int = 1  # dev evaluations (checkpoint candidates) per epoch
    replay_per_batch: int = 0  # old queries added to each batch when replay is given
    # Batches of queries of similar token width (less padding, faster steps).
    # Off by default: it changes which queries share a batch, so runs recorded
    # before it would not repeat bit for bit.
    bucket_by_length: bool = False
    device: str | None = None  # None: CUDA if available

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (
                self.evals_per_epoch >= 1,
                f"evals_per_epoch must be >= 1, got {self.evals_per_epoch}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass(frozen=True)
class Progress:
    """One progress event: a step finished, or a dev evaluation."""

    epoch: int
    step: int
    total_steps: int
    loss: float
    penalty: float = 0.0
    dev_accuracy: float | None = None


@dataclass
class TrainResult:
    best_dev: Metrics | None
    best_step: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["best_dev"] = self.best_dev.as_dict() if self.best_dev else None
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_lambda(total: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / rest)

    return f


def _check_trainable(queries: Sequence[Query], what: str) -> None:
    if not queries:
        raise ConfigError(f"{what} has no queries")
    for i, q in enumerate(queries):
        if not q.candidates:
            raise ConfigError(f"{what}: query {i} ({q.mention!r}) has no candidates")
        if q.gold_index() < 0:
            raise ConfigError(
                f"{what}: query {i} ({q.mention!r}): gold {q.gold!r} is not among its "
                "candidates; training needs the gold inserted (attach_candidates(insert_gold=True))"
            )


def train(
    model: Ranker,
    train_queries: Sequence[Query],
    dev_queries: Sequence[Query] = (),
    config: TrainConfig | None = None,
    *,
    penalty: Penalty | None = None,
    param_groups: ParamGroups | None = None,
    replay: Sequence[Query] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_queries``; keep the weights that did
    best on ``dev_queries`` (the last ones when there is no dev split).

    ``should_stop`` is polled every step, so a caller (the worker) can cancel
    cooperatively; the model then holds the best weights seen so far.
    """
    cfg = config or TrainConfig()
    _check_trainable(train_queries, "training set")
    if replay:
        _check_trainable(replay, "replay set")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    model.train()

    if param_groups is not None:
        groups = param_groups(model, cfg.lr)
    elif cfg.head_lr is not None:
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if not n.startswith("head.")], "lr": cfg.lr},
            {"params": [p for n, p in named if n.startswith("head.")], "lr": cfg.head_lr},
        ]
    else:
        groups = model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_queries) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, int(cfg.warmup * total))
    )
    use_amp = cfg.amp and device.type == "cuda"
    eval_at = {
        round(steps_per_epoch * (j + 1) / cfg.evals_per_epoch) for j in range(cfg.evals_per_epoch)
    }

    rng = random.Random(cfg.seed)
    order = list(range(len(train_queries)))
    # Tokenised once (and cached across runs): no tokenisation inside the loop.
    data = encoded_queries(model, train_queries)
    replay_data = encoded_queries(model, replay) if replay and data is not None else None
    best: Metrics | None = None
    best_state: dict[str, Tensor] | None = None
    best_step = 0
    history: list[dict] = []
    step = 0
    stopped = False
    t0 = time.perf_counter()

    for epoch in range(cfg.epochs):
        rng.shuffle(order)
        if cfg.bucket_by_length and data is not None:
            epoch_batches = length_buckets(order, data, cfg.batch_size, rng)
        else:
            epoch_batches = [
                order[b * cfg.batch_size : (b + 1) * cfg.batch_size] for b in range(steps_per_epoch)
            ]
        for b, idx in enumerate(epoch_batches):
            if should_stop is not None and should_stop():
                stopped = True
                break
            # indices, not queries: the same draws as sampling the list itself
            extra = (
                rng.sample(range(len(replay)), min(cfg.replay_per_batch, len(replay)))
                if replay and cfg.replay_per_batch
                else []
            )
            if data is not None:
                picks = [(data, i) for i in idx]
                if replay_data is not None:
                    picks += [(replay_data, j) for j in extra]
                batch = collate(picks).to(device)
            else:
                chunk = [train_queries[i] for i in idx]
                chunk += [replay[j] for j in extra] if replay else []
                batch = model.encode(chunk).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                scores = model(batch)
            loss = ranking_loss(scores.float(), batch.candidate_mask, batch.labels)
            pen = penalty(model) if penalty is not None else None
            total_loss = loss + pen if pen is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            event = Progress(
                epoch=epoch,
                step=step,
                total_steps=total,
                loss=float(loss.detach()),
                penalty=float(pen.detach()) if pen is not None else 0.0,
            )
            if (b + 1) in eval_at:
                dev = (
                    evaluate(model, dev_queries, batch_size=cfg.eval_batch_size)
                    if dev_queries
                    else None
                )
                model.train()
                acc = dev.accuracy if dev else None
                event = Progress(**{**asdict(event), "dev_accuracy": acc})
                history.append(
                    {"epoch": epoch, "step": step, "loss": event.loss, "dev_accuracy": acc}
                )
                if dev is None or best is None or dev.accuracy > best.accuracy:
                    best, best_step = dev, step
                    # host copy: the device keeps only the live weights
                    best_state = {
                        k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                    }
                log.debug("epoch %d step %d dev accuracy %s", epoch, step, acc)
            if on_progress is not None:
                on_progress(event)
        if stopped:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_dev=best,
        best_step=best_step,
        steps=step,
        seconds=time.perf_counter() - t0,
        history=history,
        stopped=stopped,
    )
