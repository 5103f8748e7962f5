"""An experiment's configuration: a TOML file in ``experiments/`` read into
frozen dataclasses (docs/experiments.md lists every key).

Every key has a default, so a config names only what differs; unknown keys
raise ``ConfigError`` (a typo must not silently run the default).
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kronlink.errors import ConfigError
from kronlink.penalties import PENALTY_METHODS
from kronlink.training import TrainConfig

__all__ = [
    "PAPER_GRID",
    "TIERS",
    "CurvatureSpec",
    "EarlySpec",
    "ExperimentConfig",
    "FigureSpec",
    "RankerSpec",
    "SelectionSpec",
    "TaskSpec",
    "TierSpec",
    "load_config",
    "parse_config",
]

# The paper's λ grid (arXiv 2111.06012, Table 3).
PAPER_GRID = (1e1, 1e3, 1e5, 1e7, 1e9)
# Tier 3's λ procedures: A's carried and B's on the grid; both on the grid;
# the paper's appendix A (B's around its tier-2 λs, chosen on B's drop).
TIER3_SEARCH = ("carry", "joint", "appendix_a")
TIERS = ("tier1", "combined", "tier2", "tier3", "early")
PENALTIES = PENALTY_METHODS
EARLY_METHODS = ("none", "lrc", "replay", *PENALTIES)


@dataclass(frozen=True)
class TaskSpec:
    names: tuple[str, ...] = ("icd10cm", "hpo", "drugs")
    candidates: int = 10  # per query (the paper: 10 or 25)
    limit: int | None = None  # builder's limit: first N raw mentions; None: all
    split_rules: tuple[str, ...] = ("mention",)  # the first is the headline
    seed: int = 0  # split and candidate-shuffle seed (fixed across training seeds)
    # Seeded random subsets of each split after building; None keeps all.
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None
    # Prebuilt task folders by name (skips the builder), relative to the config.
    dirs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CurvatureSpec:
    kinds: tuple[str, ...] = ("kfac", "ekfac", "diag")
    fisher: str = "empirical"
    include_other: bool = True
    batch_size: int = 32
    limit: int | None = None  # train queries used for the curvature; None: all


@dataclass(frozen=True)
class SelectionSpec:
    grid: tuple[float, ...] = PAPER_GRID
    margin: float = 0.02  # "within 2 points" of the unpenalised new-task dev accuracy


@dataclass(frozen=True)
class RankerSpec:
    name: str
    kind: str  # "cnn" or "transformer"
    model: Mapping[str, Any] = field(default_factory=dict)  # build_ranker overrides
    train: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields
    tiers: tuple[str, ...] = TIERS
    # Tier overrides for this ranker only (a transformer on CPU runs less).
    tier2_orderings: tuple[tuple[str, ...], ...] | None = None
    tier2_methods: tuple[str, ...] | None = None
    grid: tuple[float, ...] | None = None
    # One λ grid per penalty (around each method's knee), over ``grid``.
    method_grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # [train, dev, test] subset sizes for this ranker, replacing [tasks]' (a
    # transformer on CPU sees fewer queries than the CNN).
    limits: tuple[int | None, int | None, int | None] | None = None

    def grid_for(self, method: str, default: Sequence[float]) -> tuple[float, ...]:
        """The λ grid ``method`` is searched on for this ranker."""
        return tuple(self.method_grids.get(method) or self.grid or default)

    def train_config(self, seed: int, device: str | None) -> TrainConfig:
        # TOML has no null: "none" stands for None (e.g. head_lr = "none": one rate).
        train = {k: None if v == "none" else v for k, v in self.train.items()}
        return TrainConfig(**{**train, "seed": seed, "device": device})


@dataclass(frozen=True)
class TierSpec:
    methods: tuple[str, ...] = ("none", "ewc", "kfc", "ekfac")
    orderings: tuple[tuple[str, ...], ...] | None = None  # None: every ordering
    search: str = "carry"  # tier 3: one of TIER3_SEARCH (see docs/experiments.md)
    seeds: tuple[int, ...] | None = None  # None: the top-level seeds
    layers: bool = True  # tier 2: store Ω by layer of each chosen run


@dataclass(frozen=True)
class EarlySpec:
    ordering: tuple[str, ...] = ("icd10cm", "hpo")
    fraction: float = 0.1
    methods: tuple[str, ...] = EARLY_METHODS
    lrc_gamma: float = 1 / 2.6
    replay_size: int = 1000
    replay_per_batch: int = 4
    seeds: tuple[int, ...] | None = None  # None: the top-level seeds


@dataclass(frozen=True)
class FigureSpec:
    task: str = "hpo"
    queries: int = 300  # train queries: the model's training set and the Fisher's sample
    epochs: int = 3
    embedding_dim: int = 16
    channels: int = 16
    hidden_size: int = 16


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    path: Path | None = None  # the TOML file; relative task dirs resolve against it
    description: str = ""
    results: str | None = None  # folder for run records; None: results/<name>
    scratch: str | None = None  # weights, states, built tasks; None: the results folder
    seeds: tuple[int, ...] = (0,)
    device: str | None = None
    # Processes running independent runs side by side (`--workers` overrides).
    workers: int = 1
    tasks: TaskSpec = field(default_factory=TaskSpec)
    curvature: CurvatureSpec = field(default_factory=CurvatureSpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    rankers: tuple[RankerSpec, ...] = ()
    tier2: TierSpec = field(default_factory=TierSpec)
    tier3: TierSpec = field(default_factory=TierSpec)
    early: EarlySpec = field(default_factory=EarlySpec)
    figure2: FigureSpec | None = None  # Figure 2 runs when the config has a [figure2] table

    @property
    def results_dir(self) -> Path:
        return Path(self.results) if self.results else Path("results") / self.name

    def task_dir(self, name: str) -> Path | None:
        d = self.tasks.dirs.get(name)
        if d is None:
            return None
        p = Path(d)
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p

    def orderings(self, spec: TierSpec, length: int) -> list[tuple[str, ...]]:
        if spec.orderings is not None:
            return [tuple(o) for o in spec.orderings]
        return list(itertools.permutations(self.tasks.names, length))


def _pick(cls: type, raw: Mapping[str, Any], where: str, **extra: Any) -> Any:
    """``cls(**raw)`` with lists turned into tuples and unknown keys refused."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {unknown}; known: {sorted(known)}")
    kw = {k: _tuples(v) for k, v in raw.items()}
    try:
        return cls(**kw, **extra)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from exc


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


def _check(cfg: ExperimentConfig) -> None:
    names = cfg.tasks.names
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"[tasks] names must be distinct and non-empty, got {list(names)}")
    for rule in cfg.tasks.split_rules:
        if rule not in ("mention", "concept"):
            raise ConfigError(f"[tasks] split_rules: expected mention or concept, got {rule!r}")
    if not cfg.rankers:
        raise ConfigError("at least one [rankers.NAME] section is needed")
    if not cfg.seeds:
        raise ConfigError("seeds must hold at least one seed")
    if not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {cfg.workers!r}")
    grid = cfg.selection.grid
    if not grid or any(not 0 < float(v) < float("inf") for v in grid):
        raise ConfigError(f"[selection] grid must hold finite values > 0, got {list(grid)}")
    if not 0 <= cfg.selection.margin <= 1:
        raise ConfigError(f"[selection] margin must be in [0, 1], got {cfg.selection.margin}")
    for tier, spec, length in (("tier2", cfg.tier2, 2), ("tier3", cfg.tier3, 3)):
        bad = [m for m in spec.methods if m not in ("none", *PENALTIES)]
        if bad or "none" not in spec.methods:
            raise ConfigError(
                f"[{tier}] methods must include 'none' (the reference of the λ rule) and "
                f"otherwise be among {list(PENALTIES)}, got {list(spec.methods)}"
            )
        if spec.search not in TIER3_SEARCH:
            raise ConfigError(
                f"[{tier}] search must be one of {list(TIER3_SEARCH)}, got {spec.search!r}"
            )
        for o in spec.orderings or ():
            _check_ordering(o, length, names, tier)
    _check_ordering(cfg.early.ordering, 2, names, "early")
    bad = [m for m in cfg.early.methods if m not in EARLY_METHODS]
    if bad or "none" not in cfg.early.methods:
        raise ConfigError(
            f"[early] methods must include 'none' and be among {list(EARLY_METHODS)}, "
            f"got {list(cfg.early.methods)}"
        )
    if not 0 < cfg.early.fraction <= 1:
        raise ConfigError(f"[early] fraction must be in (0, 1], got {cfg.early.fraction}")
    for r in cfg.rankers:
        if r.kind not in ("cnn", "transformer"):
            raise ConfigError(f"[rankers.{r.name}] kind must be cnn or transformer, got {r.kind!r}")
        bad = [t for t in r.tiers if t not in TIERS]
        if bad:
            raise ConfigError(f"[rankers.{r.name}] tiers: unknown {bad}; known: {list(TIERS)}")
        if r.limits is not None and len(r.limits) != 3:
            raise ConfigError(f"[rankers.{r.name}] limits: expected [train, dev, test]")
        for m, g in r.method_grids.items():
            if m not in PENALTIES or not g or any(not 0 < float(v) < float("inf") for v in g):
                raise ConfigError(
                    f"[rankers.{r.name}] method_grids.{m}: expected a penalty of "
                    f"{list(PENALTIES)} with finite λ values > 0, got {g!r}"
                )
        for o in r.tier2_orderings or ():
            _check_ordering(o, 2, names, f"rankers.{r.name}")
        r.train_config(0, None)  # TrainConfig validates its own fields
    if cfg.figure2 is not None and cfg.figure2.task not in names:
        raise ConfigError(f"[figure2] task {cfg.figure2.task!r} is not among [tasks] names")


def _check_ordering(o: Sequence[str], length: int, names: Sequence[str], where: str) -> None:
    if len(o) != length or len(set(o)) != length or any(t not in names for t in o):
        raise ConfigError(
            f"[{where}] ordering {list(o)}: expected {length} distinct task names of {list(names)}"
        )


def parse_config(raw: Mapping[str, Any], path: Path | None = None) -> ExperimentConfig:
    """An ``ExperimentConfig`` from a parsed TOML mapping."""
    raw = dict(raw)
    rankers_raw = raw.pop("rankers", {})
    sections = {
        "tasks": TaskSpec,
        "curvature": CurvatureSpec,
        "selection": SelectionSpec,
        "tier2": TierSpec,
        "tier3": TierSpec,
        "early": EarlySpec,
        "figure2": FigureSpec,
    }
    kw: dict[str, Any] = {}
    for key, cls in sections.items():
        if key in raw:
            kw[key] = _pick(cls, raw.pop(key), key)
    if "name" not in raw:
        raise ConfigError("the config needs a top-level name")
    rankers = []
    for rname, rraw in rankers_raw.items():
        rankers.append(_pick(RankerSpec, rraw, f"rankers.{rname}", name=rname))
    cfg = _pick(ExperimentConfig, raw, "top level", path=path, rankers=tuple(rankers), **kw)
    _check(cfg)
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and check a TOML experiment file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(raw, path)
