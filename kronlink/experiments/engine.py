"""The machinery under the protocol (runner.py): the result types, task
loading and subsetting, models and curvature states from stored runs, and
one stored training run (``_Engine._train_run``). The runner decides what to
run; this module runs one thing and stores it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.schema import Query
from kronlink.errors import KronlinkError
from kronlink.evaluation import evaluate, metrics_from_ranks, rank_of_gold
from kronlink.experiments.claims import Claims
from kronlink.experiments.config import PENALTIES, ExperimentConfig, RankerSpec
from kronlink.experiments.metrics import Choice
from kronlink.experiments.store import RunStore, spec_id
from kronlink.models import Ranker, build_ranker
from kronlink.models.base import masked_log_softmax
from kronlink.penalties import build_penalty, predicted_forgetting
from kronlink.strategies import lrc_param_groups
from kronlink.training import pick_device, seed_everything, train

__all__ = ["Missing", "OutOfTime", "Results", "Search", "TaskData"]

log = logging.getLogger(__name__)

Event = Callable[[str], None]


class Missing(KronlinkError):
    """A run the config defines has no stored record (report mode)."""


class OutOfTime(KronlinkError):
    """The time budget ran out before a run could start; rerun to go on."""


@dataclass
class TaskData:
    name: str
    key: dict
    train: list[Query]
    dev: list[Query]
    test: list[Query]


@dataclass
class Search:
    """A λ search for one (ordering, method): the grid's runs and both rules' choices."""

    rows: list[dict]  # run records, in grid order
    lambdas: list[tuple[float, ...]]
    paper: Choice
    data_free: Choice

    @property
    def chosen(self) -> dict:
        return self.rows[self.paper.index]

    @property
    def chosen_data_free(self) -> dict:
        return self.rows[self.data_free.index]


@dataclass
class Results:
    """What the protocol produced, keyed by (ranker, split rule, seed, ...)."""

    config: ExperimentConfig
    tier1: dict[tuple, dict] = field(default_factory=dict)  # (+ task)
    combined: dict[tuple, dict] = field(default_factory=dict)
    tier2: dict[tuple, dict] = field(default_factory=dict)  # (+ ordering, method): record
    tier2_search: dict[tuple, Search] = field(default_factory=dict)
    tier3: dict[tuple, dict] = field(default_factory=dict)
    tier3_search: dict[tuple, Search] = field(default_factory=dict)
    early_single: dict[tuple, dict] = field(default_factory=dict)
    early: dict[tuple, dict] = field(default_factory=dict)  # (+ method)
    early_search: dict[tuple, Search] = field(default_factory=dict)
    states: dict[str, dict] = field(default_factory=dict)  # state id -> record
    layers: dict[tuple, dict] = field(default_factory=dict)  # tier-2 key -> Ω by layer
    figure2: dict | None = None
    ran: int = 0
    reused: int = 0
    missing: list[str] = field(default_factory=list)
    complete: bool = True


def _subset(queries: Sequence[Query], n: int | None, seed: int) -> list[Query]:
    """A seeded random subset (the whole list when ``n`` is None or larger)."""
    picked = list(queries)
    if n is None or n >= len(picked):
        return picked
    random.Random(seed).shuffle(picked)
    return picked[:n]


@torch.no_grad()
def test_ranks(model: Ranker, queries: Sequence[Query], batch_size: int) -> tuple[list[int], float]:
    """Per-query rank of the gold (1-based, 0 when absent: as ``evaluate``)
    and the mean negative log-likelihood of the gold over the queries whose
    gold is among the candidates (NaN if none)."""
    was_training = model.training
    model.eval()
    ranks: list[int] = []
    nll_sum, nll_n = 0.0, 0
    try:
        for start in range(0, len(queries), batch_size):
            batch = model.encode(list(queries[start : start + batch_size])).to(model.device)
            scores = model(batch).float()
            ranks.extend(rank_of_gold(scores, batch.candidate_mask, batch.labels))
            logp = masked_log_softmax(scores, batch.candidate_mask)
            has = batch.labels >= 0
            if bool(has.any()):
                gold = logp.gather(1, batch.labels.clamp_min(0).unsqueeze(1)).squeeze(1)
                nll_sum -= float(gold[has].sum())
                nll_n += int(has.sum())
    finally:
        model.train(was_training)
    return ranks, (nll_sum / nll_n if nll_n else math.nan)


@functools.lru_cache(maxsize=32)
def folder_digest(folder: str) -> str:
    """sha256 over a folder's file names and contents: a prebuilt task or an
    encoder keyed by what it holds, not where it lies, so a run record made on
    one machine is found again on another that holds the same inputs."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _ranker_key(r: RankerSpec) -> dict:
    # The name is a label: renaming a ranker must not rerun it.
    model = dict(r.model)
    enc = model.get("encoder")
    if isinstance(enc, str) and enc not in ("none", "default") and Path(enc).is_dir():
        model["encoder"] = {"folder": Path(enc).name, "sha256": folder_digest(enc)}
    return {"kind": r.kind, "model": model, "train": dict(r.train)}


class _Engine:
    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        execute: bool,
        tiers: Sequence[str] | None = None,
        rankers: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        deadline: float | None = None,
        guess_seconds: Mapping[str, float] | None = None,
        on_event: Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.execute = execute
        self.only_tiers = set(tiers) if tiers else None
        self.only_rankers = set(rankers) if rankers else None
        self.seeds = list(seeds) if seeds is not None else list(cfg.seeds)
        self.deadline = deadline
        # Seconds a run of each kind takes: a prior guess (the dry run's), then
        # the longest seen in this invocation. No run starts that would not fit.
        self.guess = dict(guess_seconds or {})
        self.longest: dict[str, float] = {}
        self.emit = on_event or (lambda _m: None)
        self.store = RunStore(cfg.results_dir, cfg.scratch)
        # Beside the records: every process that writes them must see the same locks.
        self.claims = Claims(self.store.root / "claims")
        self.results = Results(cfg)
        # "kind id" of every run this process computed (a later pass over the
        # protocol finds them stored, and must not count them as reused).
        self.ran_here: set[str] = set()
        self.found: set[str] = set()  # runs found stored (each counted once)
        self.device = pick_device(cfg.device)
        self._tasks: dict[str, TaskData] = {}
        self._makers: dict[str, Callable[[bool], dict]] = {}
        self._state_cache: dict[str, TaskState] = {}

    # ---- tasks ---------------------------------------------------------------

    def task_key(
        self, name: str, rule: str, ranker: RankerSpec, fraction: float | None = None
    ) -> dict:
        t = self.cfg.tasks
        folder = self.cfg.task_dir(name)
        build = (
            {"dir": folder.name, "sha256": folder_digest(str(folder))}
            if folder is not None
            else {
                "builder": name,
                "candidates": t.candidates,
                "limit": t.limit,
                "split_rule": rule,
                "seed": t.seed,
            }
        )
        key = {
            "name": name,
            "build": build,
            "subsets": list(ranker.limits or (t.train_limit, t.dev_limit, t.test_limit)),
        }
        if fraction is not None:
            key["fraction"] = fraction
        return key

    def task(self, key: dict) -> TaskData:
        kid = spec_id(key)
        if kid in self._tasks:
            return self._tasks[kid]
        from kronlink.data.builders import build_task
        from kronlink.data.io import load_task, save_task

        build = key["build"]
        if "dir" in build:
            folder = self.cfg.task_dir(key["name"])
            assert folder is not None
            task = load_task(folder)
        else:
            folder = self.store.task_dir(key["name"], build)
            # Waits rather than defers: a build is short, and every run needs it.
            with self.claims.hold(f"task-{folder.name}", wait=True):
                if (folder / "task.json").exists():
                    task = load_task(folder)
                else:
                    self.emit(f"building task {key['name']} ({build['split_rule']} split)")
                    task = build_task(
                        key["name"],
                        seed=build["seed"],
                        split_rule=build["split_rule"],
                        k=build["candidates"],
                        limit=build["limit"],
                    )
                    save_task(task, folder)
        seed = self.cfg.tasks.seed
        limits = dict(zip(("train", "dev", "test"), key["subsets"], strict=True))
        splits = {s: _subset(task.split(s), limits[s], seed) for s in limits}
        if "fraction" in key:
            f = key["fraction"]
            splits = {s: _subset(q, max(1, math.ceil(f * len(q))), seed) for s, q in splits.items()}
        data = TaskData(key["name"], key, splits["train"], splits["dev"], splits["test"])
        for s in ("train", "dev", "test"):
            if not getattr(data, s):
                raise KronlinkError(f"task {key['name']!r} has no {s} queries after subsetting")
        self._tasks[kid] = data
        return data

    # ---- models, states ----------------------------------------------------------

    def _check_time(self, kind: str = "") -> None:
        if self.deadline is None:
            return
        need = self.longest.get(kind, self.guess.get(kind, 0.0))
        left = self.deadline - time.monotonic()
        if left <= need:
            raise OutOfTime(
                f"time budget: {left:.0f} s left, a {kind or 'run'} needs ~{need:.0f} s"
            )

    def _took(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)

    def _new_model(self, ranker: RankerSpec, seed: int) -> Ranker:
        seed_everything(seed)  # the head is randomly initialised
        # TOML has no null: "none" stands for None (a tiny random vocabulary or encoder).
        overrides = {k: None if v == "none" else v for k, v in ranker.model.items()}
        return build_ranker(ranker.kind, **overrides)

    def _model_of(self, record: dict, ranker: RankerSpec, seed: int) -> Ranker:
        """A fresh model holding the weights of a stored run (re-run if pruned)."""
        weights = self.store.load_weights(record["id"])
        if weights is None:
            self.emit(f"weights of {record['kind']} run {record['id']} are gone: re-running it")
            self._makers[record["id"]](True)
            weights = self.store.load_weights(record["id"])
            if weights is None:
                raise KronlinkError(f"re-running {record['id']} did not store its weights")
        model = self._new_model(ranker, seed)
        model.load_state_dict(weights)
        return model.to(self.device)

    def state(self, record: dict, task_key: dict, ranker: RankerSpec, seed: int) -> str:
        """Id of the curvature state of a stored model on its task's train split."""
        c = self.cfg.curvature
        spec = {
            "model": record["id"],
            "task": task_key,
            "curvature": {
                "kinds": list(c.kinds),
                "fisher": c.fisher,
                "include_other": c.include_other,
                "batch_size": c.batch_size,
                "limit": c.limit,
            },
        }
        sid = spec_id(spec)
        done = self.store.get("state", spec)
        # The report needs only the record; training needs the file too.
        if done is not None and (not self.execute or self.store.state_path(sid).exists()):
            self.results.states[sid] = done
            return sid
        if not self.execute:
            self.results.missing.append(f"state {sid}")
            raise Missing(f"curvature state {sid} is not stored")
        with self.claims.hold(f"state-{sid}"):
            done = self.store.get("state", spec)
            if done is not None and self.store.state_path(sid).exists():
                # Stored by another process between the first look and the claim.
                self.results.states[sid] = done
                return sid
            return self._compute_state(spec, sid, record, task_key, ranker, seed)

    def _compute_state(
        self, spec: dict, sid: str, record: dict, task_key: dict, ranker: RankerSpec, seed: int
    ) -> str:
        c = self.cfg.curvature
        self._check_time("state")
        self.emit(f"running state {sid} (curvature on run {record['id']})")
        wall0 = time.perf_counter()
        model = self._model_of(record, ranker, seed)
        data = self.task(task_key)
        queries = _subset(data.train, c.limit, self.cfg.tasks.seed)
        batches = [
            model.encode(queries[i : i + c.batch_size])
            for i in range(0, len(queries), c.batch_size)
        ]
        t0 = time.perf_counter()
        curvature = estimate_curvature(
            model, batches, kinds=c.kinds, fisher=c.fisher, include_other=c.include_other
        )
        seconds = time.perf_counter() - t0
        stats = {"task": data.name, "train_size": len(data.train), "model_run": record["id"]}
        TaskState.from_model(model, curvature, stats).save(self.store.state_path(sid))
        rec = self.store.put(
            "state", spec, {"seconds": seconds, "n_examples": curvature.n_examples, **stats}
        )
        self.results.states[sid] = rec
        self.ran_here.add(f"state {sid}")
        self._took("state", time.perf_counter() - wall0)
        self.emit(f"curvature of {data.name} on run {record['id']}: {seconds:.1f} s")
        return sid

    def _load_state(self, sid: str) -> TaskState:
        if sid not in self._state_cache:
            self._state_cache[sid] = TaskState.load(self.store.state_path(sid))
        return self._state_cache[sid]

    # ---- one training run ----------------------------------------------------------

    def _evaluate(self, model: Ranker, tasks: Sequence[TaskData], eval_bs: int) -> dict:
        out = {}
        for t in tasks:
            dev = evaluate(model, t.dev, batch_size=eval_bs)
            ranks, nll = test_ranks(model, t.test, eval_bs)
            test = metrics_from_ranks(ranks)
            out[t.name] = {
                "dev": dev.accuracy,
                "test": test.accuracy,
                "test_mrr": test.mrr,
                "n_dev": dev.n,
                "n_test": test.n,
                # Per query, in the test split's order: the bootstrap over
                # queries (endpoint.py) resamples these.
                "test_ranks": ranks,
                "test_nll": nll,
            }
        return out

    def _train_run(
        self,
        kind: str,
        spec: dict,
        *,
        ranker: RankerSpec,
        seed: int,
        start: Callable[[], Ranker],
        train_q: Callable[[], list[Query]],
        dev_q: Callable[[], list[Query]],
        eval_tasks: Callable[[], list[TaskData]],
        keep_weights: bool,
        priors: Sequence[str] = (),
        method: str = "none",
        lambdas: Sequence[float] = (),
        extra: dict | None = None,
    ) -> dict:
        rid = spec_id(spec)
        what = f"{method}{'' if not lambdas else ' λ=' + ','.join(f'{v:g}' for v in lambdas)}"

        def make(need_weights: bool = False) -> dict:
            """Run it under its claim (``Busy`` if another process is running
            it); ``need_weights``: its record exists but its weights are gone."""
            with self.claims.hold(f"{kind}-{rid}"):
                done = self.store.get(kind, spec)
                # Stored by another process between the first look and the claim.
                if done is not None and (not need_weights or self.store.model_path(rid).exists()):
                    return done
                return compute()

        def compute() -> dict:
            self._check_time(kind)
            self.emit(f"running {kind} {rid} {what}")
            wall0 = time.perf_counter()
            model = start()
            cfg = ranker.train_config(seed, self.cfg.device)
            states = [self._load_state(s) for s in priors]
            penalty = build_penalty(method, states, list(lambdas)) if method in PENALTIES else None
            groups = lrc_param_groups(extra["lrc_gamma"]) if method == "lrc" else None
            replay = None
            if method == "replay":
                replay = extra["replay_set"]()
                from dataclasses import replace

                cfg = replace(cfg, replay_per_batch=extra["replay_per_batch"])
            t0 = time.perf_counter()
            res = train(
                model,
                train_q(),
                dev_q(),
                cfg,
                penalty=penalty,
                param_groups=groups,
                replay=replay,
            )
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = self._evaluate(model, eval_tasks(), cfg.eval_batch_size)
            omega = predicted_forgetting(model, states) if states else []
            t_eval = time.perf_counter() - t0
            if keep_weights:
                self.store.save_weights(rid, model)
            result = {
                "metrics": metrics,
                "predicted_forgetting": omega,
                "train": {k: v for k, v in res.as_dict().items() if k != "best_dev"},
                "seconds": {"train": t_train, "eval": t_eval},
                "device": str(self.device),
                "torch": torch.__version__,
            }
            rec = self.store.put(kind, spec, result)
            self.ran_here.add(f"{kind} {rid}")
            self._took(kind, time.perf_counter() - wall0)
            accs = ", ".join(f"{t} {m['test']:.3f}" for t, m in metrics.items())
            self.emit(f"{kind} {rid} {what}: test {accs} ({t_train:.1f} s)")
            return rec

        self._makers[rid] = make
        rec = self.store.get(kind, spec)
        if rec is not None:
            self.found.add(f"{kind} {rid}")
            return rec
        if not self.execute:
            self.results.missing.append(f"{kind} {rid}")
            raise Missing(f"{kind} run {rid} is not stored")
        return make()
