"""The values an update job takes and gives: request, progress, result.

Plain frozen dataclasses with JSON-ready ``as_dict`` methods, so the worker can
put a request in a job payload and a result's summary in the job row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from kronlink.curvature.state import CurvatureKind, FisherType, TaskState
from kronlink.errors import ConfigError
from kronlink.evaluation import Metrics
from kronlink.models.base import Ranker
from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod
from kronlink.training import TrainConfig, TrainResult

__all__ = [
    "HALF_DECADE_GRID",
    "PAPER_GRID",
    "PHASES",
    "SelectionRow",
    "UpdateProgress",
    "UpdateRequest",
    "UpdateResult",
]

# The paper's λ grid (arXiv 2111.06012, Table 3): steps of 100x.
PAPER_GRID: tuple[float, ...] = (1e1, 1e3, 1e5, 1e7, 1e9)
# Half-decades 1, 3, 10, 30, ..., 1e9 (DESIGN.md section 5: the trade-off is steep).
HALF_DECADE_GRID: tuple[float, ...] = tuple(
    sorted({float(m * 10**e) for e in range(10) for m in (1, 3)} - {3e9})
)
# Phases in the order they run; "select_lambda" only with lambdas="auto".
PHASES = ("validate", "select_lambda", "train", "curvature", "evaluate")

# The curvature a method's penalty reads, so the new state serves the next update.
_NEEDS = {
    "ewc": CurvatureKind.DIAG,
    "kfc": CurvatureKind.KFAC,
    "kfc-expand": CurvatureKind.KFAC,
    "ekfac": CurvatureKind.EKFAC,
    "ekfac-expand": CurvatureKind.EKFAC,
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class UpdateRequest:
    """How to fold one new task into a model (DESIGN.md sections 4 and 5)."""

    # Penalty against every prior task (PenaltyMethod; default DEFAULT_METHOD).
    # Replay is refused: it needs old data, which the service never keeps.
    method: str = DEFAULT_METHOD.value
    # One λ for all priors, one per prior (in the order of ``priors``), or
    # "auto": picked on the new task's dev split from ``grid``.
    lambdas: float | tuple[float, ...] | Literal["auto"] = "auto"
    # The candidates of "auto"; ``half_decades`` swaps in 1, 3, 10, 30, ...
    # up to the grid's largest value.
    lambda_grid: tuple[float, ...] = PAPER_GRID
    half_decades: bool = False
    # "auto" keeps λ whose dev accuracy is >= unpenalised dev accuracy - margin.
    auto_margin: float = 0.02
    train: TrainConfig = field(default_factory=TrainConfig)
    # Curvature of the new task; None: kfac + diag, plus ekfac for method ekfac.
    kinds: tuple[str, ...] | None = None
    fisher: str = "empirical"  # or "true" (labels sampled from the model)
    include_other: bool = True  # diagonal Fisher for LayerNorm (the paper drops it)
    curvature_batch_size: int = 16
    state_dtype: str = "fp32"  # factors on disk: fp32 or bf16 (anchors keep full precision)
    eval_batch_size: int = 64  # dev evaluations during training and the final ones
    quality_gate: float | None = None  # minimum test accuracy; None: always passes
    # The retriever's own top-1 on this task's dev split (the caller measures it
    # with the retriever that made the candidates); a model below it is refused:
    # ranking would make the answers worse than the candidates' order. None: no check.
    retriever_dev_top1: float | None = None
    # The exact-name prior the final dev/test evaluation ranks with
    # (kronlink.ranking): the worker passes the serving setting, so the
    # version's reported accuracy is that of the order it will serve. 0: the model alone.
    exact_margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.exact_margin >= 0:
            raise ConfigError(f"exact_margin must be >= 0 (nats), got {self.exact_margin}")
        if self.method == "replay":
            raise ConfigError(
                "method 'replay' is refused: it trains on old tasks' data, which the "
                "update service never keeps; use kfc, ekfac, ewc, l2 or none"
            )
        if self.method not in tuple(PenaltyMethod):
            raise ConfigError(
                f"method must be one of {', '.join(PenaltyMethod)}, got {self.method!r}"
            )
        lam = self.lambdas
        if isinstance(lam, str):
            if lam != "auto":
                raise ConfigError(f"lambdas must be a number, a list or 'auto', got {lam!r}")
        else:
            values = [lam] if isinstance(lam, int | float) else list(lam)
            if not values or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf
                for v in values
            ):
                raise ConfigError(f"λ values must be finite numbers >= 0, got {lam!r}")
            norm = float(values[0]) if isinstance(lam, int | float) else tuple(map(float, values))
            object.__setattr__(self, "lambdas", norm)
        grid = tuple(float(v) for v in self.lambda_grid)
        if not grid or any(not 0 < v < math.inf for v in grid):
            raise ConfigError(f"lambda_grid must hold finite values > 0, got {self.lambda_grid!r}")
        object.__setattr__(self, "lambda_grid", grid)
        if not 0 <= self.auto_margin <= 1:
            raise ConfigError(f"auto_margin must be in [0, 1], got {self.auto_margin}")
        if self.fisher not in tuple(FisherType):
            raise ConfigError(f"fisher must be 'empirical' or 'true', got {self.fisher!r}")
        if self.state_dtype not in _DTYPES:
            raise ConfigError(f"state_dtype must be 'fp32' or 'bf16', got {self.state_dtype!r}")
        if self.curvature_batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(
                "curvature_batch_size and eval_batch_size must be >= 1, got "
                f"{self.curvature_batch_size} and {self.eval_batch_size}"
            )
        if self.quality_gate is not None and not 0 <= self.quality_gate <= 1:
            raise ConfigError(f"quality_gate must be in [0, 1] or None, got {self.quality_gate}")
        kinds = self.curvature_kinds
        bad = [k for k in kinds if k not in tuple(CurvatureKind)]
        if bad or not kinds:
            raise ConfigError(f"kinds must be among kfac, ekfac, diag, got {self.kinds!r}")
        need = _NEEDS.get(self.method)
        if need is not None and need not in kinds:
            raise ConfigError(
                f"method {self.method!r} needs {str(need)!r} among the new task's kinds "
                f"(the next update penalises with it), got {list(kinds)}"
            )

    @property
    def auto(self) -> bool:
        return self.lambdas == "auto"

    @property
    def grid(self) -> tuple[float, ...]:
        """The λ candidates of "auto", ascending."""
        if self.half_decades:
            return tuple(v for v in HALF_DECADE_GRID if v <= max(self.lambda_grid))
        return tuple(sorted(set(self.lambda_grid)))

    @property
    def curvature_kinds(self) -> tuple[str, ...]:
        if self.kinds is not None:
            return tuple(self.kinds)
        return ("kfac", "diag", "ekfac") if self.method == "ekfac" else ("kfac", "diag")

    @property
    def state_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.state_dtype]

    def lambdas_for(self, n_priors: int) -> list[float]:
        """Fixed λ per prior (not for "auto"); ConfigError on a length mismatch."""
        if isinstance(self.lambdas, str):
            raise ConfigError("lambdas='auto' has no fixed values")
        if isinstance(self.lambdas, float):
            return [self.lambdas] * n_priors
        if len(self.lambdas) != n_priors:
            raise ConfigError(
                f"one λ per prior task expected: {n_priors} prior(s), "
                f"{len(self.lambdas)} λ value(s) {list(self.lambdas)}"
            )
        return list(self.lambdas)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas) if isinstance(self.lambdas, tuple) else self.lambdas
        d["kinds"] = list(self.curvature_kinds)
        return d


@dataclass(frozen=True)
class UpdateProgress:
    """One progress event. ``message`` says what is running ("started",
    "λ=1000 (run 3/6)", "done in 1.2 s"); step counts restart per training run."""

    phase: str
    epoch: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    penalty: float | None = None
    dev_accuracy: float | None = None
    message: str = ""


@dataclass(frozen=True)
class SelectionRow:
    """One candidate of "auto": λ (None for the unpenalised reference run),
    the new task's best dev accuracy, each prior's predicted forgetting Ω_i
    at the trained weights, and whether it met the margin / was chosen."""

    lam: float | None
    dev_accuracy: float
    predicted_forgetting: list[float]
    eligible: bool
    chosen: bool = False
    steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UpdateResult:
    """What ``run_update`` returns. ``model`` is the object passed in, trained
    in place. A stopped update has ``stopped=True``, ``new_state=None``,
    ``gate_passed=False`` and the model's starting weights: not a success."""

    model: Ranker
    new_state: TaskState | None
    lambdas: list[float]
    selection: list[SelectionRow]
    test: Metrics | None
    dev: Metrics | None
    predicted_forgetting: list[float]
    timings: dict[str, float]
    gate_passed: bool
    stopped: bool = False
    reused_selection_run: bool = False  # final weights are the chosen "auto" run's
    train_result: TrainResult | None = None
    gate_message: str = ""  # why the gate failed; "" when it passed
    # kronlink.calibration.Calibrator.as_dict(), fitted on dev; None: not calibrated
    calibration: dict[str, Any] | None = None
    # kronlink.retrieval_prior.RetrievalPrior.as_dict(), fitted on dev (its info
    # holds the grid and the retriever's dev/test top-1); None: no retriever given
    retrieval_prior: dict[str, Any] | None = None
    # dev/test metrics of the same model without the retrieval prior ("exact_only")
    # and without any prior ("model_alone"); ``test``/``dev`` are the served score's
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Finished, and the quality gate passed: safe to promote."""
        return not self.stopped and self.new_state is not None and self.gate_passed

    def summary(self) -> dict[str, Any]:
        """JSON-ready: no weights, no tensors, no data."""
        return {
            "stopped": self.stopped,
            "gate_passed": self.gate_passed,
            "lambdas": self.lambdas,
            "reused_selection_run": self.reused_selection_run,
            "selection": [r.as_dict() for r in self.selection],
            "test": self.test.as_dict() if self.test else None,
            "dev": self.dev.as_dict() if self.dev else None,
            "predicted_forgetting": self.predicted_forgetting,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "new_state_stats": dict(self.new_state.stats) if self.new_state else None,
            "calibration": self.calibration,
            "retrieval_prior": self.retrieval_prior,
            "ablations": self.ablations,
        }
