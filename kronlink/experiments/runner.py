"""The paper's protocol over stored runs (DESIGN.md section 5; the procedure
and the formulas are written out in docs/experiments.md).

driver.py walks these tiers (``run_experiment``, ``collect_results``).

Per ranker, split rule and seed:

- tier 1: one model per task, and one on all tasks combined;
- tier 2: every ordered pair (A, B): the tier-1 model of A trained on B with
  no penalty, and with each penalty at each λ of the grid; λ chosen by the
  paper's rule (``metrics.select_paper``) on the dev splits;
- tier 3: every ordering (A, B, C): from tier 2's chosen (A, B) model of the
  same method, trained on C with one λ per prior task (``search``: "carry"
  keeps A's λ from tier 2 and searches B's on the grid; "joint" searches
  both), chosen by the same rule on the mean drop of A and B;
- early: a ``fraction`` subsample of one ordering with none, learning-rate
  control, replay, L2, EWC and KFC (the paper's Table 1).

Only the library's own training, curvature, penalty, strategy and
evaluation functions run here: this module decides what to run and stores it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from kronlink.experiments.claims import Busy
from kronlink.experiments.config import RankerSpec
from kronlink.experiments.engine import (
    Missing,
    OutOfTime,
    Results,
    Search,
    _Engine,
    _ranker_key,
)
from kronlink.experiments.metrics import GridRow, select_data_free, select_paper
from kronlink.experiments.store import spec_id
from kronlink.strategies import replay_sample

__all__ = ["Missing", "OutOfTime", "Results", "Search"]


class _Tiers(_Engine):
    """The tiers over the engine's runs (driver.py walks them)."""

    # ---- tiers ---------------------------------------------------------------------

    def tier1(self, ranker: RankerSpec, rule: str, seed: int, name: str) -> dict:
        key = self.task_key(name, rule, ranker)
        spec = {"tier": "tier1", "ranker": _ranker_key(ranker), "seed": seed, "task": key}
        rec = self._train_run(
            "tier1",
            spec,
            ranker=ranker,
            seed=seed,
            start=lambda: self._new_model(ranker, seed),
            train_q=lambda: self.task(key).train,
            dev_q=lambda: self.task(key).dev,
            eval_tasks=lambda: [self.task(key)],
            keep_weights=True,
        )
        self.results.tier1[(ranker.name, rule, seed, name)] = rec
        return rec

    def combined(self, ranker: RankerSpec, rule: str, seed: int) -> dict:
        keys = [self.task_key(n, rule, ranker) for n in self.cfg.tasks.names]
        spec = {"tier": "combined", "ranker": _ranker_key(ranker), "seed": seed, "tasks": keys}
        rec = self._train_run(
            "combined",
            spec,
            ranker=ranker,
            seed=seed,
            start=lambda: self._new_model(ranker, seed),
            train_q=lambda: [q for k in keys for q in self.task(k).train],
            dev_q=lambda: [q for k in keys for q in self.task(k).dev],
            eval_tasks=lambda: [self.task(k) for k in keys],
            keep_weights=False,
        )
        self.results.combined[(ranker.name, rule, seed)] = rec
        return rec

    def _stage(
        self,
        tier: str,
        ranker: RankerSpec,
        seed: int,
        parent: dict,
        seen: Sequence[dict],
        new: dict,
        method: str,
        lambdas: Sequence[float],
        priors: Sequence[str],
        keep_weights: bool,
        extra: dict | None = None,
    ) -> dict:
        spec: dict[str, Any] = {
            "tier": tier,
            "ranker": _ranker_key(ranker),
            "seed": seed,
            "parent": parent["id"],
            "seen": list(seen),
            "task": new,
            "method": method,
            "lambdas": [float(v) for v in lambdas],
            "priors": list(priors),
        }
        if extra:
            spec["options"] = {k: v for k, v in extra.items() if not callable(v)}
        return self._train_run(
            tier,
            spec,
            ranker=ranker,
            seed=seed,
            start=lambda: self._model_of(parent, ranker, seed),
            train_q=lambda: self.task(new).train,
            dev_q=lambda: self.task(new).dev,
            eval_tasks=lambda: [self.task(k) for k in (*seen, new)],
            keep_weights=keep_weights,
            priors=priors,
            method=method,
            lambdas=lambdas,
            extra=extra,
        )

    def _search(
        self,
        tier: str,
        ranker: RankerSpec,
        seed: int,
        parent: dict,
        seen: Sequence[dict],
        new: dict,
        method: str,
        candidates: Sequence[tuple[float, ...]],
        priors: Sequence[str],
        reference: dict,
        keep_weights: bool,
        select_on: Sequence[str] | None = None,
    ) -> Search:
        """Runs every λ vector of ``candidates`` and applies both rules, with
        ``reference`` (the unpenalised run) as the new task's yardstick; the
        old-data rule weighs the drops of ``select_on`` (default: every prior)."""
        rows, busy = [], None
        for lam in candidates:
            # A row another process is running is skipped, not waited for, so
            # processes side by side share one grid.
            try:
                rows.append(
                    self._stage(
                        tier, ranker, seed, parent, seen, new, method, lam, priors, keep_weights
                    )
                )
            except Busy as exc:
                busy = busy or exc
        if busy is not None:
            raise busy
        names = list(select_on) if select_on else [k["name"] for k in seen]
        new_name = new["name"]
        grid = [
            GridRow(
                tuple(lam),
                tuple(r["metrics"][n]["dev"] for n in names),
                r["metrics"][new_name]["dev"],
            )
            for lam, r in zip(candidates, rows, strict=True)
        ]
        ref_new = reference["metrics"][new_name]["dev"]
        ref_old = [parent["metrics"][n]["dev"] for n in names]
        margin = self.cfg.selection.margin
        search = Search(
            rows,
            [tuple(c) for c in candidates],
            select_paper(grid, ref_new, ref_old, margin),
            select_data_free(grid, ref_new, margin),
        )
        if keep_weights and self.execute:
            keep = {search.chosen["id"], search.chosen_data_free["id"]}
            for r in rows:
                if r["id"] not in keep:
                    self.store.drop_weights(r["id"])
        return search

    def tier2(
        self, ranker: RankerSpec, rule: str, seed: int, ordering: tuple[str, ...], method: str
    ) -> dict:
        """The tier-2 run of (A, B) for ``method`` (λ chosen by the paper's rule)."""
        a, b = ordering
        key = (ranker.name, rule, seed, ordering, method)
        if key in self.results.tier2:
            return self.results.tier2[key]
        single = self.tier1(ranker, rule, seed, a)
        ka, kb = self.task_key(a, rule, ranker), self.task_key(b, rule, ranker)
        # Tier 3 and the Ω-by-layer breakdown start from tier 2's chosen models:
        # keep their weights (the search drops the others).
        keep = True
        sa = self.state(single, ka, ranker, seed)
        if method == "none":
            rec = self._stage("tier2", ranker, seed, single, [ka], kb, "none", [], [], keep)
        else:
            none = self.tier2(ranker, rule, seed, ordering, "none")
            grid = ranker.grid_for(method, self.cfg.selection.grid)
            search = self._search(
                "tier2", ranker, seed, single, [ka], kb, method,
                [(float(v),) for v in grid], [sa], none, keep,
            )  # fmt: skip
            self.results.tier2_search[key] = search
            rec = search.chosen
        self.results.tier2[key] = rec
        if self.cfg.tier2.layers:
            self.layers(key, rec, sa, ranker, seed)
        return rec

    def layers(self, key: tuple, record: dict, sid: str, ranker: RankerSpec, seed: int) -> None:
        """Ω of the prior split by layer, at the weights of ``record``."""
        from kronlink.experiments.analysis import omega_by_layer

        spec = {"run": record["id"], "prior": sid}
        rec = self.store.get("layers", spec)
        if rec is None:
            if not self.execute:
                self.results.missing.append(f"layers {spec_id(spec)}")
                return
            with self.claims.hold(f"layers-{spec_id(spec)}"):
                rec = self.store.get("layers", spec)
                if rec is None:
                    self._check_time("layers")
                    wall0 = time.perf_counter()
                    model = self._model_of(record, ranker, seed)
                    omega = omega_by_layer(model, self._load_state(sid))
                    rec = self.store.put("layers", spec, {"omega": omega})
                    self._took("layers", time.perf_counter() - wall0)
        self.results.layers[key] = rec

    def tier3(
        self, ranker: RankerSpec, rule: str, seed: int, ordering: tuple[str, ...], method: str
    ) -> dict:
        a, b, _c = ordering
        key = (ranker.name, rule, seed, ordering, method)
        if key in self.results.tier3:
            return self.results.tier3[key]
        stage2 = self.tier2(ranker, rule, seed, (a, b), method)
        ka, kb, kc = (self.task_key(n, rule, ranker) for n in ordering)
        if method == "none":
            rec = self._stage("tier3", ranker, seed, stage2, [ka, kb], kc, "none", [], [], False)
        else:
            single = self.tier1(ranker, rule, seed, a)
            sa = self.state(single, ka, ranker, seed)
            sb = self.state(stage2, kb, ranker, seed)
            none = self.tier3(ranker, rule, seed, ordering, "none")
            grid = [float(v) for v in ranker.grid_for(method, self.cfg.selection.grid)]
            if self.cfg.tier3.search == "carry":
                # A's penalty keeps the weight tier 2 chose for it; B's is searched.
                lam_a = float(stage2["spec"]["lambdas"][0])
                candidates = [(lam_a, v) for v in grid]
            elif self.cfg.tier3.search == "appendix_a":
                # The paper's appendix A: B's λ searched x/÷100 around the
                # geometric mean of the λs tier 2 chose with B as the old task,
                # chosen on B's drop alone; A's λ carried as above.
                lam_a = float(stage2["spec"]["lambdas"][0])
                centre = self._geometric_tier2_lambda(ranker, rule, seed, b, method)
                candidates = [(lam_a, float(f"{centre * 10.0**k:.12g}")) for k in range(-2, 3)]
            else:
                candidates = [(u, v) for u in grid for v in grid]
            select_on = [b] if self.cfg.tier3.search == "appendix_a" else None
            search = self._search(
                "tier3", ranker, seed, stage2, [ka, kb], kc, method, candidates, [sa, sb],
                none, False, select_on,
            )  # fmt: skip
            self.results.tier3_search[key] = search
            rec = search.chosen
        self.results.tier3[key] = rec
        return rec

    def _geometric_tier2_lambda(
        self, ranker: RankerSpec, rule: str, seed: int, old: str, method: str
    ) -> float:
        """Geometric mean of the λs tier 2 chose for ``method`` on every (old, X)."""
        lams = [
            float(self.tier2(ranker, rule, seed, (old, x), method)["spec"]["lambdas"][0])
            for x in self.cfg.tasks.names
            if x != old
        ]
        return math.exp(statistics.fmean(math.log(v) for v in lams))

    def early(self, ranker: RankerSpec, rule: str, seed: int) -> None:
        e = self.cfg.early
        a, b = e.ordering
        ka = self.task_key(a, rule, ranker, e.fraction)
        kb = self.task_key(b, rule, ranker, e.fraction)
        spec = {"tier": "early_single", "ranker": _ranker_key(ranker), "seed": seed, "task": ka}
        single = self._train_run(
            "early_single",
            spec,
            ranker=ranker,
            seed=seed,
            start=lambda: self._new_model(ranker, seed),
            train_q=lambda: self.task(ka).train,
            dev_q=lambda: self.task(ka).dev,
            eval_tasks=lambda: [self.task(ka)],
            keep_weights=True,
        )
        base = (ranker.name, rule, seed)
        self.results.early_single[base] = single
        none = self._stage("early", ranker, seed, single, [ka], kb, "none", [], [], False)
        self.results.early[(*base, "none")] = none
        for method in e.methods:
            if method == "none":
                continue
            if method == "lrc":
                rec = self._stage(
                    "early", ranker, seed, single, [ka], kb, "lrc", [], [], False,
                    {"lrc_gamma": e.lrc_gamma},
                )  # fmt: skip
            elif method == "replay":
                extra = {
                    "replay_size": e.replay_size,
                    "replay_per_batch": e.replay_per_batch,
                    "replay_set": lambda: replay_sample(self.task(ka).train, e.replay_size, seed),
                }
                rec = self._stage(
                    "early", ranker, seed, single, [ka], kb, "replay", [], [], False, extra
                )
            else:
                sa = self.state(single, ka, ranker, seed)
                grid = ranker.grid_for(method, self.cfg.selection.grid)
                search = self._search(
                    "early", ranker, seed, single, [ka], kb, method,
                    [(float(v),) for v in grid], [sa], none, False,
                )  # fmt: skip
                self.results.early_search[(*base, method)] = search
                rec = search.chosen
            self.results.early[(*base, method)] = rec

    def figure2(self) -> None:
        from kronlink.experiments.fisher_figure import figure2_run

        spec_cfg = self.cfg.figure2
        assert spec_cfg is not None
        key = self.task_key(spec_cfg.task, self.cfg.tasks.split_rules[0], self.cfg.rankers[0])
        spec = {"tier": "figure2", "task": key, "figure": vars(spec_cfg)}
        rec = self.store.get("figure2", spec)
        path = self.store.root / "figure2" / f"{spec_id(spec)}.safetensors"
        if rec is None or not path.exists():
            if not self.execute:
                self.results.missing.append("figure2")
                raise Missing("figure 2 is not stored")
            with self.claims.hold(f"figure2-{spec_id(spec)}"):
                rec = self.store.get("figure2", spec)
                if rec is None or not path.exists():
                    self._check_time("figure2")
                    self.emit("running figure 2")
                    result = figure2_run(self.task(key).train, spec_cfg, path)
                    rec = self.store.put("figure2", spec, result)
                    self.ran_here.add("figure2")
                    self.emit(f"figure 2: relative errors {result['relative_error']}")
        else:
            self.found.add("figure2")
        self.results.figure2 = {**rec, "matrices": str(path)}
