"""Walking the protocol (runner.py's tiers): ``run_experiment`` trains what
is not stored yet, ``collect_results`` only reads (the report uses it), so a
report shows exactly the runs its config defines.

A walk is repeated until nothing is left: a cell whose run, or a run it
starts from, another process holds (claims.py) is skipped and comes back in
the next pass. That is what lets processes share one results folder, side by
side (parallel.py) or as two invocations, and compute each run once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kronlink.experiments.claims import Busy
from kronlink.experiments.config import ExperimentConfig, RankerSpec, TierSpec
from kronlink.experiments.engine import Event, Missing, OutOfTime, Results
from kronlink.experiments.runner import _Tiers

__all__ = ["collect_results", "run_experiment"]


class _Protocol(_Tiers):
    """The tiers, walked in the order the paper runs them."""

    def _tiers(self, ranker: RankerSpec) -> set[str]:
        tiers = set(ranker.tiers)
        return tiers & self.only_tiers if self.only_tiers is not None else tiers

    @staticmethod
    def _seed_in(seeds: Sequence[int] | None, seed: int) -> bool:
        return seeds is None or seed in seeds

    def _guard(self, fn: Callable[[], Any]) -> None:
        """In report mode a missing run skips its cell, not the whole report;
        a run another process holds defers its cell to the next pass."""
        try:
            fn()
        except Missing:
            self.results.complete = False
        except Busy as exc:
            self.results.complete = False
            if exc.name not in self._told:
                self._told.add(exc.name)
                self.emit(f"{exc.name}: another process is running it; on to the next")
            self._busy.append(exc.name)

    def run(self) -> Results:
        """Walk the protocol until nothing is left. A cell whose run (or a run
        it needs) another process holds is skipped; the walk is repeated,
        waiting for one held run whenever a pass could start nothing, so
        processes sharing a results folder split the work and each run is
        computed once. Each pass rebuilds ``results`` from the store."""
        self._told: set[str] = set()
        while True:
            before = len(self.ran_here)
            self._busy: list[str] = []
            self.results = Results(self.cfg)
            stopped = self._walk()
            if stopped or not self._busy:
                break
            # Nothing could start: wait for one held run rather than spin.
            if len(self.ran_here) == before and not self.claims.wait_free(
                self._busy[0], self.deadline
            ):
                self.results.complete = False
                self.emit("time budget spent waiting for another process; rerun to continue")
                break
        # Training runs and Figure 2, as before; curvature states are not counted.
        self.results.ran = sum(1 for r in self.ran_here if not r.startswith("state "))
        self.results.reused = len(self.found - self.ran_here)
        return self.results

    def _walk(self) -> bool:
        """One pass over the protocol; True if the time budget stopped it."""
        cfg = self.cfg
        stopped = False
        try:
            if cfg.figure2 is not None and (
                self.only_tiers is None or "figure2" in self.only_tiers
            ):
                self._guard(self.figure2)
            for ranker in cfg.rankers:
                if self.only_rankers is not None and ranker.name not in self.only_rankers:
                    continue
                tiers = self._tiers(ranker)
                for rule in cfg.tasks.split_rules:
                    headline = rule == cfg.tasks.split_rules[0]
                    for seed in self.seeds:
                        self._ranker_seed(ranker, rule, seed, tiers, headline)
        except OutOfTime:
            self.results.complete = False
            stopped = True
            self.emit("time budget spent: stopped before the next run; rerun to continue")
        if self.results.missing:
            self.results.complete = False
        return stopped

    def _ranker_seed(
        self, ranker: RankerSpec, rule: str, seed: int, tiers: set[str], headline: bool
    ) -> None:
        cfg = self.cfg
        if "tier1" in tiers:
            for name in cfg.tasks.names:
                self._guard(lambda n=name: self.tier1(ranker, rule, seed, n))
        if "combined" in tiers:
            self._guard(lambda: self.combined(ranker, rule, seed))
        if not headline:
            return  # tiers 2, 3 and early use the headline split only
        if "tier2" in tiers and self._seed_in(cfg.tier2.seeds, seed):
            orderings = (
                [tuple(o) for o in ranker.tier2_orderings]
                if ranker.tier2_orderings
                else cfg.orderings(cfg.tier2, 2)
            )
            methods = ranker.tier2_methods or cfg.tier2.methods
            for o in orderings:
                for m in methods:
                    self._guard(lambda o=o, m=m: self.tier2(ranker, rule, seed, o, m))
        if "tier3" in tiers and self._seed_in(cfg.tier3.seeds, seed):
            spec: TierSpec = cfg.tier3
            for o in cfg.orderings(spec, 3):
                for m in spec.methods:
                    self._guard(lambda o=o, m=m: self.tier3(ranker, rule, seed, o, m))
        if "early" in tiers and self._seed_in(cfg.early.seeds, seed):
            self._guard(lambda: self.early(ranker, rule, seed))


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tiers: Sequence[str] | None = None,
    rankers: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_seconds: float | None = None,
    on_event: Event | None = None,
    guess_seconds: Mapping[str, float] | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> Results:
    """Run every run of ``cfg`` that is not stored yet (optionally only some
    tiers, rankers or seeds). With ``max_seconds``, no run starts that would
    not end inside that budget (its length: the longest of its kind so far,
    else ``guess_seconds[kind]``, else 0); ``Results.complete`` is then False
    and a rerun goes on. With ``workers`` > 1, that many processes run
    independent runs side by side (parallel.py), ``threads`` torch threads
    each (default: the cores split between them); with one, this process
    runs everything and its thread setting is left alone."""
    if workers > 1:
        from kronlink.experiments.parallel import run_side_by_side

        return run_side_by_side(
            cfg,
            workers,
            tiers=tiers,
            rankers=rankers,
            seeds=seeds,
            max_seconds=max_seconds,
            on_event=on_event,
            guess_seconds=guess_seconds,
            threads=threads,
        )
    deadline = time.monotonic() + max_seconds if max_seconds is not None else None
    proto = _Protocol(
        cfg,
        execute=True,
        tiers=tiers,
        rankers=rankers,
        seeds=seeds,
        deadline=deadline,
        on_event=on_event,
        guess_seconds=guess_seconds,
    )
    return proto.run()


def collect_results(cfg: ExperimentConfig) -> Results:
    """The stored runs of ``cfg``, walked as ``run_experiment`` would, without
    training anything; ``missing`` lists what is not stored."""
    return _Protocol(cfg, execute=False).run()
