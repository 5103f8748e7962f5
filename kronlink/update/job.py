"""``run_update``: fold one new task into a model, without any old data.

The broker-free, database-free core of the worker's update job (issue 5,
DESIGN.md sections 1, 4 and 5). Phases, each timed:

1. ``validate``: the task has train, dev and test queries, every query has
   candidates, every train query has its gold among them; every prior's
   curvature and anchor fit the model; λ values match the priors. Nothing
   trains before this passes.
2. ``select_lambda`` (``lambdas="auto"`` only): from the same starting weights
   and seed, one unpenalised run and one run per grid λ, each keeping its best
   dev checkpoint. Chosen: ``λ* = max{λ ∈ grid : acc_dev(λ) >= acc_dev(0) - margin}``,
   one λ for every prior (if no λ qualifies, the smallest grid value). Each
   row records the dev accuracy and every prior's predicted forgetting
   ``Ω_i``. Only the new task's data is used: data-free for old tasks.
3. ``train``: with "auto" the chosen run's weights are reused (training is
   seeded, so a rerun would give the same weights); with fixed λ, one run.
4. ``curvature``: the new task's curvature on its train split, anchored on
   the trained weights.
5. ``evaluate``: with a ``retriever``, the retrieval prior's ``beta`` fitted on
   dev (kronlink.retrieval_prior); test and dev metrics of the served score
   (model, exact-name prior, retrieval prior) and without the priors; ``Ω_i``
   for every prior; the gate, on the served score; the calibrator, fitted on
   the served score.

On an error or a stop the model gets its starting weights back (a host copy
taken after validation); if restoring fails too, the error propagates and the
caller must discard the model object. Validation errors happen before any
weight changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from torch import Tensor

from kronlink.calibration import (
    Calibrator,
    calibratable,
    expected_calibration_error,
    fit_calibrator,
    fit_temperature,
)
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.schema import SPLITS, Query, Task
from kronlink.errors import CheckpointError, ConfigError, DataFormatError
from kronlink.evaluation import (
    Metrics,
    evaluate,
    metrics_from_scored,
    score_queries,
    top1_right,
)
from kronlink.models.base import Ranker
from kronlink.penalties import build_penalty, predicted_forgetting
from kronlink.retrieval_prior import RetrievalPrior, Searcher, fit_retrieval_prior, retrieval_ranks
from kronlink.training import Progress, TrainConfig, TrainResult, train
from kronlink.update.types import SelectionRow, UpdateProgress, UpdateRequest, UpdateResult

__all__ = ["UpdateStopped", "run_update"]

log = logging.getLogger(__name__)

OnProgress = Callable[[UpdateProgress], None]


class UpdateStopped(Exception):
    """Raised inside ``run_update`` when ``should_stop`` says so; never escapes."""


def run_update(
    model: Ranker,
    priors: Sequence[TaskState],
    task: Task,
    request: UpdateRequest,
    *,
    on_progress: OnProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    retriever: Searcher | None = None,
) -> UpdateResult:
    """Train ``model`` in place on ``task`` under ``request.method``'s penalty
    against ``priors``, estimate the new task's state, evaluate, gate.

    Raises ``DataFormatError`` for a malformed task, ``ConfigError`` for
    options that do not fit the priors, ``CheckpointError`` for priors that do
    not fit the model, all before any training step. ``should_stop`` is polled
    between steps (training) and batches (curvature); a stopped update returns
    ``stopped=True`` and no state. See the module docstring for the phases
    and what happens to ``model`` on failure.

    ``retriever``: the one that made (or would make) the dev and test
    candidates; with it the retrieval prior is fitted on dev and the served
    score uses it. None: no retrieval prior (the research experiments' setting).
    """
    job = _Job(model, list(priors), task, request, on_progress, should_stop)
    job.retriever = retriever
    return job.run()


class _Job:
    def __init__(
        self,
        model: Ranker,
        priors: list[TaskState],
        task: Task,
        request: UpdateRequest,
        on_progress: OnProgress | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.model, self.priors, self.task, self.req = model, priors, task, request
        self._emit = on_progress or (lambda _e: None)
        self._stop = should_stop or (lambda: False)
        self.timings: dict[str, float] = {}
        self.cfg: TrainConfig = replace(request.train, eval_batch_size=request.eval_batch_size)
        self.splits: dict[str, list[Query]] = {}
        self.start: dict[str, Tensor] = {}
        self.selection: list[SelectionRow] = []
        self.lambdas: list[float] = []
        self.reused = False
        self.train_result: TrainResult | None = None
        self.calibration: dict | None = None
        self.retriever: Searcher | None = None
        self.prior: RetrievalPrior | None = None
        self.ranks: dict[str, list[list[int]]] = {}
        self.ablations: dict[str, dict] = {}
        # the exact-name margin in score units: req.exact_margin (calibrated
        # nats) times the model's dev temperature (_scale_margin)
        self.margin_scale = 1.0
        self.margin = request.exact_margin
        self.dev_alone: Metrics | None = None
        self._current = "validate"

    # ---- driver ---------------------------------------------------------

    def run(self) -> UpdateResult:
        t_all = time.perf_counter()
        try:
            with self._phase("validate"):
                self._validate()
            # Host copy of the starting weights: restored on an error or a stop.
            self.start = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            chosen: dict[str, Tensor] | None = None
            if self.req.auto and self._penalised:
                with self._phase("select_lambda"):
                    chosen = self._select()
            with self._phase("train"):
                self._train(chosen)
            with self._phase("curvature"):
                state = self._curvature()
            with self._phase("evaluate"):
                self._scale_margin()
                self.prior = self._fit_prior()
                test, dev, forgetting, passed = self._evaluate()
                self.calibration = self._calibrate()
        except UpdateStopped:
            self._restore()
            self.timings["total"] = time.perf_counter() - t_all
            return self._result(None, stopped=True)
        except BaseException:
            self._restore()
            raise
        self.timings["total"] = time.perf_counter() - t_all
        return self._result(state, test=test, dev=dev, forgetting=forgetting, passed=passed)

    def _result(self, state: TaskState | None, *, stopped: bool = False, **kw) -> UpdateResult:
        return UpdateResult(
            model=self.model,
            new_state=state,
            lambdas=self.lambdas,
            selection=self.selection,
            test=kw.get("test"),
            dev=kw.get("dev"),
            predicted_forgetting=kw.get("forgetting", []),
            timings=self.timings,
            gate_passed=bool(kw.get("passed", False)) and not stopped,
            stopped=stopped,
            reused_selection_run=self.reused,
            train_result=self.train_result,
            gate_message=getattr(self, "gate_message", ""),
            calibration=self.calibration,
            retrieval_prior=self.prior.as_dict() if self.prior is not None else None,
            ablations=self.ablations,
        )

    @property
    def _penalised(self) -> bool:
        return self.req.method != "none" and bool(self.priors)

    def _phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def _check_stop(self) -> None:
        if self._stop():
            raise UpdateStopped

    def _restore(self) -> None:
        if self.start:
            self.model.load_state_dict(self.start)
            self.model.eval()

    # ---- phases -----------------------------------------------------------

    def _validate(self) -> None:
        name = self.task.name
        for split in SPLITS:
            qs = self.task.split(split)
            if not qs:
                raise DataFormatError(
                    f"task {name!r} has no {split} queries: an update needs train, dev and "
                    f"test splits, got sizes {[len(self.task.split(s)) for s in SPLITS]}",
                    field="split",
                )
            for i, q in enumerate(qs):
                if not q.candidates:
                    raise DataFormatError(
                        f"task {name!r}, {split} query {i} ({q.mention!r}) has no candidates: "
                        "expected them attached (attach_candidates) before an update",
                        field="candidates",
                    )
                if split == "train" and q.gold_index() < 0:
                    raise DataFormatError(
                        f"task {name!r}, train query {i} ({q.mention!r}): gold {q.gold!r} is "
                        f"not among its {len(q.candidates)} candidates; training needs it there",
                        field="gold",
                    )
            self.splits[split] = qs
        params = dict(self.model.named_parameters())
        if not any(p.requires_grad for p in params.values()):
            raise ConfigError("the model has no trainable parameters")
        for i, prior in enumerate(self.priors):
            label = f"prior {i} ({prior.stats.get('task', '?')})"
            try:
                prior.curvature.validate(self.model)
            except CheckpointError as exc:
                raise CheckpointError(f"{label}: {exc}") from exc
            for pname, t in prior.anchor.items():
                if pname not in params or tuple(params[pname].shape) != tuple(t.shape):
                    got = tuple(params[pname].shape) if pname in params else "absent"
                    raise CheckpointError(
                        f"{label}: anchor {pname!r} has shape {tuple(t.shape)}, model: {got}"
                    )
        if not self.req.auto:
            self.lambdas = self.req.lambdas_for(len(self.priors))
        if self.req.method == "none" or (self.req.auto and not self.priors):
            self.lambdas = [0.0] * len(self.priors)
        # Builds every prior's penalty once: checks each has the curvature the method needs.
        build_penalty(self.req.method, self.priors, self.lambdas or 0.0)
        self._emit(
            UpdateProgress(
                "validate",
                message=f"task {name!r}: "
                + ", ".join(f"{len(self.splits[s])} {s}" for s in SPLITS)
                + f"; {len(self.priors)} prior(s); method {self.req.method}",
            )
        )

    def _fit(self, lambdas: list[float] | None, message: str) -> TrainResult:
        """One training run from the current weights; UpdateStopped if stopped."""
        penalty = build_penalty(self.req.method, self.priors, lambdas) if lambdas else None
        phase = self._current

        def relay(p: Progress) -> None:
            self._emit(
                UpdateProgress(
                    phase,
                    p.epoch,
                    p.step,
                    p.total_steps,
                    p.loss,
                    p.penalty,
                    p.dev_accuracy,
                    message,
                )
            )

        res = train(
            self.model,
            self.splits["train"],
            self.splits["dev"],
            self.cfg,
            penalty=penalty,
            on_progress=relay,
            should_stop=self._stop,
        )
        if res.stopped:
            raise UpdateStopped
        return res

    def _run_row(self, lam: float | None, k: int, n: int) -> tuple[SelectionRow, TrainResult]:
        self.model.load_state_dict(self.start)
        t0 = time.perf_counter()
        lambdas = None if lam is None else [lam] * len(self.priors)
        what = "unpenalised" if lam is None else f"λ={lam:g}"
        res = self._fit(lambdas, f"{what} (run {k}/{n})")
        acc = res.best_dev.accuracy if res.best_dev else 0.0
        omega = predicted_forgetting(self.model, self.priors)
        row = SelectionRow(lam, acc, omega, lam is None, steps=res.steps)
        return replace(row, seconds=time.perf_counter() - t0), res

    def _select(self) -> dict[str, Tensor]:
        grid = self.req.grid
        n = len(grid) + 1
        ref, _ = self._run_row(None, 1, n)
        floor = ref.dev_accuracy - self.req.auto_margin
        rows = [ref]
        # One host copy at a time: the run of the largest eligible λ so far
        # (the grid ascends), or the smallest λ's while none is eligible.
        kept: tuple[int, dict[str, Tensor], TrainResult] | None = None
        found = False
        for k, lam in enumerate(grid, start=2):
            row, res = self._run_row(lam, k, n)
            row = replace(row, eligible=row.dev_accuracy >= floor)
            rows.append(row)
            if row.eligible or kept is None:
                snap = {
                    key: v.detach().to("cpu", copy=True)
                    for key, v in self.model.state_dict().items()
                }
                kept = (len(rows) - 1, snap, res)
                found = found or row.eligible
        if not found:
            log.warning(
                "no λ kept dev accuracy within %s; using the smallest", self.req.auto_margin
            )
        assert kept is not None  # the grid is never empty (UpdateRequest checks)
        idx, weights, res = kept
        rows[idx] = replace(rows[idx], chosen=True)
        self.selection = rows
        lam = rows[idx].lam
        self.lambdas = [float(lam)] * len(self.priors)  # type: ignore[arg-type]
        self.train_result = res
        self._emit(
            UpdateProgress(
                "select_lambda",
                dev_accuracy=rows[idx].dev_accuracy,
                message=f"chose λ={lam:g} (unpenalised dev {ref.dev_accuracy:.4f}, "
                f"margin {self.req.auto_margin})"
                + ("" if found else "; no λ within the margin, took the smallest"),
            )
        )
        return weights

    def _train(self, chosen: dict[str, Tensor] | None) -> None:
        if chosen is not None:
            self.model.load_state_dict(chosen)
            self.model.eval()
            self.reused = True
            self._emit(UpdateProgress("train", message="reused the chosen selection run"))
            return
        lambdas = self.lambdas if self._penalised and any(self.lambdas) else None
        what = "unpenalised" if lambdas is None else f"λ={lambdas}"
        self.train_result = self._fit(lambdas, what)

    def _served(self, split: str) -> dict:
        """The keyword arguments that make an evaluation rank as serving will."""
        return {
            "batch_size": self.req.eval_batch_size,
            "exact_margin": self.margin,
            "retrieval_prior": self.prior,
            "retrieval_ranks": self.ranks.get(split),
        }

    def _scale_margin(self) -> None:
        """Put the exact-name margin in the units serving will use.

        ``req.exact_margin`` is in calibrated nats, and serving multiplies it
        by the version's ``Calibrator.score_scale`` (an overconfident model's
        raw scores span more nats than its probabilities deserve). The job
        must evaluate, fit the retrieval prior and calibrate at that same
        margin, or the version's recorded dev and test top-1 describe a
        ranking nobody serves. The scale is the temperature of the model's own
        dev scores (no prior added, which is what the margin competes with);
        1 when dev is too small, or has no right or no wrong top answer. It is
        recorded in the calibration (``info["exact_margin_scale"]``), which
        serving reads back."""
        if not self.req.exact_margin:
            return
        dev = self.splits["dev"]
        scored = score_queries(self.model, dev, batch_size=self.req.eval_batch_size)
        # the model_alone ablation's dev metrics: the same scores (_evaluate)
        self.dev_alone = metrics_from_scored(dev, scored)
        rows = [[s for _, s, _ in cands] for cands in scored]
        right = top1_right(dev, scored)
        # only where _calibrate can fit too: a version without a calibration
        # serves at scale 1
        if calibratable(right):
            self.margin_scale = fit_temperature(rows, right)
        self.margin = self.req.exact_margin * self.margin_scale
        self._emit(
            UpdateProgress(
                "evaluate",
                message=f"exact-name margin {self.req.exact_margin:g} calibrated nats = "
                f"{self.margin:.4g} score units (dev temperature {self.margin_scale:.4g})",
            )
        )

    def _fit_prior(self) -> RetrievalPrior | None:
        """``beta`` of the retrieval prior, fitted on dev against the model's
        score with the exact-name prior (kronlink.retrieval_prior); None
        without a retriever. Dev and test candidates get their retriever
        ranks back here (the builders store them shuffled)."""
        if self.retriever is None:
            return None
        for split in ("dev", "test"):
            self.ranks[split] = retrieval_ranks(self.splits[split], self.retriever)
        dev = self.splits["dev"]
        scored = score_queries(
            self.model, dev, batch_size=self.req.eval_batch_size, exact_margin=self.margin
        )
        gold = [q.gold_index() for q in dev]
        prior = fit_retrieval_prior([[s for _, s, _ in c] for c in scored], self.ranks["dev"], gold)
        info = dict(prior.info)
        info["test_top1_retriever"] = _retriever_top1(self.splits["test"], self.ranks["test"])
        bm25 = getattr(self.retriever, "bm25", None)
        if getattr(self.retriever, "mode", "bm25") == "fused" and bm25 is not None:
            # the fused retriever's BM25 half alone, over the whole ontology
            for split in ("dev", "test"):
                qs = self.splits[split]
                hits = bm25.search([q.mention for q in qs], 1)
                info[f"{split}_top1_bm25"] = sum(
                    bool(h) and h[0][0] == q.gold for h, q in zip(hits, qs, strict=True)
                ) / len(qs)
        self._emit(
            UpdateProgress(
                "evaluate",
                message=f"retrieval prior: beta={prior.beta:.4g} (dev top-1 {info['dev_top1']:.4f}; "
                f"model {info['dev_top1_model']:.4f}, retriever {info['dev_top1_retriever']:.4f})",
            )
        )
        return RetrievalPrior(prior.beta, prior.kind, info)

    def _evaluate(self) -> tuple[Metrics, Metrics, list[float], bool]:
        size = self.req.eval_batch_size
        test = evaluate(self.model, self.splits["test"], **self._served("test"))
        dev = evaluate(self.model, self.splits["dev"], **self._served("dev"))
        # What each prior adds: the served score against the same model without them.
        # (Only those that differ from the served score: no extra pass by default.)
        variants = {}
        if self.prior is not None or self.margin:
            variants["model_alone"] = 0.0
        if self.prior is not None and self.margin:
            variants["exact_only"] = self.margin
        for name, margin in variants.items():
            self.ablations[name] = {
                split: (
                    self.dev_alone
                    if (name, split) == ("model_alone", "dev") and self.dev_alone is not None
                    else evaluate(
                        self.model, self.splits[split], batch_size=size, exact_margin=margin
                    )
                ).as_dict()
                for split in ("dev", "test")
            }
        forgetting = predicted_forgetting(self.model, self.priors) if self.priors else []
        gate = self.req.quality_gate
        failures = []
        if gate is not None and test.accuracy < gate:
            failures.append(f"test accuracy {test.accuracy:.4f} < {gate}")
        floor = self.req.retriever_dev_top1
        if floor is not None and dev.accuracy < floor:
            failures.append(self._floor_message(dev.accuracy, floor))
        passed = not failures
        self.gate_message = "; ".join(failures)
        verdict = "passed" if passed else f"FAILED ({self.gate_message})"
        self._emit(
            UpdateProgress(
                "evaluate",
                dev_accuracy=dev.accuracy,
                message=f"test accuracy {test.accuracy:.4f}; quality gate {verdict}",
            )
        )
        return test, dev, forgetting, passed

    def _floor_message(self, dev_top1: float, floor: float) -> str:
        """Why the served dev top-1 is below the retriever's, and what to do."""
        what = (
            f"dev top-1 {dev_top1:.4f} of the served score is below the retriever's own "
            f"dev top-1 {floor:.4f} on the same split: serving this version would rank "
            "worse than the candidates arrive. "
        )
        if self.prior is None:
            return what + (
                "No retrieval prior was fitted (run_update got no retriever), so the score "
                "is the model's alone: pass the retriever that made the candidates "
                "(run_update(..., retriever=...); the worker does), or train longer or on "
                "more data"
            )
        return what + (
            f"The fitted retrieval prior (beta={self.prior.beta:.4g}) reproduces its "
            f"retriever's order, dev top-1 {self.prior.info.get('dev_top1_retriever', 0):.4f}, "
            "at the grid's largest beta, so the floor was measured with another retriever "
            "than the one passed to run_update: measure both with the same retriever "
            "(settings retriever_mode, bm25_candidates)"
        )

    def _calibrate(self) -> dict | None:
        """P(top-1 right) fitted on dev, end to end: a dev query whose gold is not
        among its candidates counts as wrong (kronlink.calibration). The scores
        are the served ones (retrieval prior included). The test split's ECE
        before and after is recorded beside it. None (logged) when
        dev cannot be calibrated against (too small, or all right/all wrong):
        the version then serves without a calibrated probability."""
        rows, right = {}, {}
        for split in ("dev", "test"):
            scored = score_queries(self.model, self.splits[split], **self._served(split))
            rows[split] = [[s for _, s, _ in cands] for cands in scored]
            right[split] = top1_right(self.splits[split], scored)
        try:
            cal = fit_calibrator(rows["dev"], right["dev"])
        except ValueError as exc:
            log.warning("no calibration for this version: %s", exc)
            return None
        raw = Calibrator("identity").many(rows["test"])
        info = dict(cal.info)
        info["exact_margin_scale"] = self.margin_scale
        info["test_ece"] = {
            "bins": 10,
            "binning": "equal-width",
            "softmax": round(expected_calibration_error(raw, right["test"]), 6),
            "calibrated": round(
                expected_calibration_error(cal.many(rows["test"]), right["test"]), 6
            ),
        }
        return Calibrator(cal.kind, cal.params, info).as_dict()

    def _curvature(self) -> TaskState:
        queries = self.splits["train"]
        batches = _Batches(self.model, queries, self.req.curvature_batch_size, self._check_stop)

        def progress(step: int, total: int | None) -> None:
            self._emit(UpdateProgress("curvature", step=step, total_steps=total))

        curvature = estimate_curvature(
            self.model,
            batches,
            kinds=self.req.curvature_kinds,
            fisher=self.req.fisher,
            include_other=self.req.include_other,
            progress=progress,
        )
        stats = {
            "task": self.task.name,
            "n_examples": curvature.n_examples,
            "train_size": len(queries),
            "method": self.req.method,
            "lambdas": self.lambdas,
        }
        return TaskState.from_model(self.model, curvature, stats)


def _retriever_top1(queries: Sequence[Query], ranks: Sequence[Sequence[int]]) -> float:
    """Share of queries whose gold is the retriever's (unique) first candidate."""
    right = sum(
        1
        for q, rk in zip(queries, ranks, strict=True)
        if (g := q.gold_index()) >= 0 and rk[g] == 0 and list(rk).count(0) == 1
    )
    return right / len(queries) if queries else 0.0


class _Phase:
    """Times a phase into ``job.timings`` and reports its start and end."""

    def __init__(self, job: _Job, name: str) -> None:
        self.job, self.name = job, name

    def __enter__(self) -> _Phase:
        self.job._check_stop()
        self.job._current = self.name
        self.t0 = time.perf_counter()
        self.job._emit(UpdateProgress(self.name, message="started"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.perf_counter() - self.t0
        self.job.timings[self.name] = seconds
        if exc_type is None:
            self.job._emit(UpdateProgress(self.name, message=f"done in {seconds:.2f} s"))


class _Batches:
    """Re-iterable batches for ``estimate_curvature`` (EKFAC takes two
    passes), encoded lazily; polls ``check`` before each batch."""

    def __init__(
        self, model: Ranker, queries: list[Query], size: int, check: Callable[[], None]
    ) -> None:
        self.model, self.queries, self.size, self.check = model, queries, size, check

    def __len__(self) -> int:
        return -(-len(self.queries) // self.size)

    def __iter__(self) -> Iterator:
        for i in range(0, len(self.queries), self.size):
            self.check()
            yield self.model.encode(self.queries[i : i + self.size])
