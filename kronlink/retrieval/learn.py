"""One task's update of the retriever's query tower, under a penalty that
keeps the earlier tasks' retrieval (issue 12, item 2).

    update = learn_retriever_task(tower, index, train, dev, priors, RetrieverLearnConfig())
    update.tower            # tuned in place; serve it with Retriever(..., encoder=update.tower.query_encoder())
    update.state.save(p)    # this task's curvature and anchor, for the next update's penalty

The steps are those of ``bench/retriever_tune.py``, whose records
(``results/retrieval/tower_full*.json``) chose the defaults: the penalty
``kfc-expand`` at λ = 1000 kept ICD-10-CM's fused recall@10 within 0.15
points after learning HPO, where no penalty lost 4.5 points.

1. the tower scores against the task's ontology (``index``, frozen);
2. :func:`~kronlink.retrieval.tower.tune` on the train mentions, with the
   penalty built from ``priors`` (the tower states of the tasks learned
   before), keeping the best dev recall (the start included);
3. the tower's curvature on up to ``curvature_queries`` train mentions (true
   Fisher, Kronecker factors plus LayerNorm's diagonal), stored without the
   split and exact blocks that only the rankers' candidate sets use, so a
   task's state holds its anchor and one Kronecker pair a layer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.schema import Query
from kronlink.errors import ConfigError
from kronlink.penalties import build_penalty, predicted_forgetting
from kronlink.retrieval.dense import DenseIndex
from kronlink.retrieval.tower import QueryTower, TuneConfig, TuneResult, tune

__all__ = ["RetrieverLearnConfig", "RetrieverUpdate", "learn_retriever_task"]


@dataclass(frozen=True)
class RetrieverLearnConfig:
    tune: TuneConfig = field(default_factory=lambda: TuneConfig(lr=5e-5))
    penalty: str = "kfc-expand"
    lam: float = 1000.0
    curvature_queries: int = 1024
    curvature_batch: int = 32

    @classmethod
    def from_settings(cls, settings: object, seed: int = 0) -> RetrieverLearnConfig:
        """The ``retriever_*`` settings (kronlink.settings), as the worker's job
        and ``kronlink update`` both read them."""
        s = settings
        return cls(
            tune=TuneConfig(
                epochs=s.retriever_epochs,
                lr=s.retriever_lr,
                max_train=s.retriever_max_train,
                seed=seed,
                eval_k=s.retriever_eval_k,
            ),
            penalty=s.retriever_penalty,
            lam=s.retriever_lambda,
            curvature_queries=s.retriever_curvature_queries,
        )

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ConfigError(f"the retriever's λ must be >= 0, got {self.lam}")
        if self.curvature_queries < 1 or self.curvature_batch < 1:
            raise ConfigError("curvature_queries and curvature_batch must be >= 1")


@dataclass
class RetrieverUpdate:
    tower: QueryTower
    state: TaskState
    tuned: TuneResult
    penalty: str  # the method, or "none" for a first task
    lam: float
    prior_tasks: int
    seconds: dict[str, float]
    # ½ Ω_i of each prior at the kept tower: the data-free forecast of how
    # much each earlier task's retrieval loss rose (nats a mention)
    predicted_forgetting: list[float] = field(default_factory=list)
    tuned_k: int = 10  # the dev metric: dense recall@tuned_k

    def summary(self) -> dict:
        """What a version records of its retriever update (no data)."""
        return {
            "tuned": True,
            "base": self.tower.base,
            "dev_recall_at": self.tuned_k,
            "dev_recall_before": self.tuned.start_dev,
            "dev_recall_after": self.tuned.best_dev,
            "steps": self.tuned.steps,
            # λ·Ω at the last dev evaluation: how far the
            # tuning pulled the tower from the earlier tasks' anchors (0: none)
            "last_penalty": self.tuned.history[-1]["penalty"] if self.tuned.history else 0.0,
            "penalty": self.penalty,
            "lambda": self.lam,
            "prior_tasks": self.prior_tasks,
            "predicted_forgetting": self.predicted_forgetting,
            "seconds": self.seconds,
        }


def learn_retriever_task(
    tower: QueryTower,
    index: DenseIndex,
    train: Sequence[Query],
    dev: Sequence[Query],
    priors: Sequence[TaskState],
    config: RetrieverLearnConfig | None = None,
    *,
    on_progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RetrieverUpdate:
    """Tune ``tower`` in place on ``train`` against ``index`` under the
    penalty of ``priors`` and estimate this task's state; see the module
    docstring. ``stopped`` in the result's ``tuned`` says a stop came."""
    cfg = config or RetrieverLearnConfig()
    tower.set_bank(index)
    t0 = time.perf_counter()
    penalty = build_penalty(cfg.penalty, list(priors), cfg.lam) if priors else None
    tuned = tune(
        tower,
        train,
        dev,
        cfg.tune,
        penalty=penalty,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    t1 = time.perf_counter()
    with torch.no_grad():
        forecast = predicted_forgetting(tower, list(priors)) if priors else []
    usable = [q for q in train if (q.gold or "") in tower._position]
    picked = random.Random(cfg.tune.seed).sample(usable, min(cfg.curvature_queries, len(usable)))
    batches = [
        tower.encode(picked[s : s + cfg.curvature_batch])
        for s in range(0, len(picked), cfg.curvature_batch)
    ]
    curvature = estimate_curvature(
        tower,
        batches,
        kinds=("kfac",),
        fisher="true",
        include_other=True,
        exact_max_params=0,
        generator=torch.Generator().manual_seed(cfg.tune.seed),
    )
    # the split factors are for candidate sets; kfc-expand and a later KFC on
    # the tower use the plain pair, so the state does not carry twice the factors
    curvature = replace(curvature, split={}, exact={})
    state = TaskState.from_model(tower, curvature, {"queries": len(picked), "kind": tower.kind})
    return RetrieverUpdate(
        tower=tower,
        state=state,
        tuned=tuned,
        penalty=cfg.penalty if priors else "none",
        lam=cfg.lam if priors else 0.0,
        prior_tasks=len(priors),
        seconds={"tune": round(t1 - t0, 1), "curvature": round(time.perf_counter() - t1, 1)},
        tuned_k=cfg.tune.eval_k,
        predicted_forgetting=[round(f, 6) for f in forecast],
    )
