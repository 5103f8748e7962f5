"""Curvature of one task as a value: Kronecker factors, EKFAC scalings and
diagonal Fisher, plus the anchor weights ``θ*`` that a penalty pulls toward.

Files are safetensors (never pickle) whose header carries the format version,
kind, names, shapes, ``n_examples`` and a sha256 of the tensor payload. A load
raises ``CheckpointError`` on real problems (bad checksum, missing tensors,
shapes that disagree with the header or with a model) and warns on small ones
(unknown extra tensors, parameters the state does not cover).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kronlink.curvature import _io
from kronlink.errors import CheckpointError, ConfigError

__all__ = [
    "CurvatureKind",
    "CurvatureState",
    "EKFACFactors",
    "FisherType",
    "KFACFactors",
    "LayerInfo",
    "Rule",
    "SplitFactors",
    "TaskState",
]


class FisherType(StrEnum):
    """Which gradients the Fisher is built from (DESIGN.md section 4)."""

    EMPIRICAL = "empirical"  # the gold label (the paper's eq. 3)
    TRUE = "true"  # one label sampled from the model's own masked softmax


class CurvatureKind(StrEnum):
    KFAC = "kfac"  # A ⊗ G per Kronecker layer
    EKFAC = "ekfac"  # eigenbases of A, G and re-estimated scalings s
    DIAG = "diag"  # diagonal Fisher of every parameter (EWC)


class Rule(StrEnum):
    """How a module's parameters are covered."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EMBEDDING = "embedding"  # one-hot input: A is diagonal, stored as a vector
    LAYERNORM = "layernorm"  # diagonal Fisher only ("other")


KRONECKER_RULES = (Rule.LINEAR, Rule.CONV1D, Rule.EMBEDDING)


@dataclass(frozen=True)
class LayerInfo:
    """A module the state covers: its name (as in ``named_modules``), rule,
    weight shape and whether it has a bias."""

    name: str
    rule: Rule
    weight_shape: tuple[int, ...]
    bias: bool

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """This module's parameter names (as in ``named_parameters``) and shapes."""
        out = {self.param_names[0]: self.weight_shape}
        if self.bias:
            # LayerNorm's bias has the weight's (normalized) shape.
            ln = self.rule is Rule.LAYERNORM
            out[self.param_names[1]] = self.weight_shape if ln else (self.g_dim,)
        return out

    @property
    def param_names(self) -> tuple[str, ...]:
        w = f"{self.name}.weight" if self.name else "weight"
        b = f"{self.name}.bias" if self.name else "bias"
        return (w, b) if self.bias else (w,)

    @property
    def kronecker(self) -> bool:
        return self.rule in KRONECKER_RULES

    @property
    def a_dim(self) -> int:
        """Size of ``A``: p (+1 with a bias); V for an Embedding (diagonal)."""
        if self.rule is Rule.EMBEDDING:
            return self.weight_shape[0]
        return math.prod(self.weight_shape[1:]) + int(self.bias)

    @property
    def g_dim(self) -> int:
        return self.weight_shape[1] if self.rule is Rule.EMBEDDING else self.weight_shape[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rule": str(self.rule),
            "weight_shape": list(self.weight_shape),
            "bias": self.bias,
        }


@dataclass(frozen=True)
class KFACFactors:
    """``F ≈ A ⊗ G`` for ``vec(W̄)`` (column-stacking). ``A`` is (p̄, p̄), or
    the (V,) diagonal for an Embedding; ``G`` is (q, q)."""

    A: Tensor
    G: Tensor


@dataclass(frozen=True)
class EKFACFactors:
    """``F ≈ (U_A ⊗ U_G) diag(vec s) (U_A ⊗ U_G)ᵀ`` (George et al. 2018).
    ``s`` has the shape of ``W̄`` (q, p̄); for an Embedding ``U_A`` is the
    identity (``None``) and ``s`` has the weight's (V, d) shape."""

    UA: Tensor | None
    UG: Tensor
    s: Tensor


@dataclass(frozen=True)
class SplitFactors:
    """The candidate-aware ("split") rule: ``F ≈ A_mean ⊗ G_mean + A_dev ⊗ G_dev``.

    Per query n with real positions t (T_n of them), ``m_n`` and ``h_n`` are
    the means of ``x̄_t`` and ``g_t``; then exactly
    ``∇W̄_n = (Σ_t g_t) m_nᵀ + Σ_t (g_t - h_n)(x̄_t - m_n)ᵀ``. The first term
    gets the "reduce" factors ``A_mean = E_n[m mᵀ]``, ``G_mean = E_n[(Σ_t g)(Σ_t g)ᵀ]``,
    the second the "expand" factors of the deviations ``A_dev`` (mean over
    real positions), ``G_dev`` (sum over a query's positions, mean over
    queries). Shapes as in ``KFACFactors``."""

    A_mean: Tensor
    G_mean: Tensor
    A_dev: Tensor
    G_dev: Tensor


@dataclass(frozen=True)
class CurvatureState:
    """Per-task curvature. ``diag`` maps parameter names to ``F_jj`` (same
    shape as the parameter); ``other`` lists parameters that only have a
    diagonal (LayerNorm); ``include_other`` says whether the KFC and EKFAC
    penalties add the diagonal terms of those. ``split`` holds the
    candidate-aware factors of Linear/Conv1d layers and ``exact`` the exact
    Fisher block ``E_n[vec ∇W̄_n vec ∇W̄_nᵀ]`` (column-stacking vec, (q·p̄)²)
    of the small ones; both are empty in a format-1 file."""

    fisher: FisherType
    n_examples: int
    kinds: tuple[CurvatureKind, ...]
    include_other: bool
    layers: Mapping[str, LayerInfo]
    kfac: Mapping[str, KFACFactors] = field(default_factory=dict)
    ekfac: Mapping[str, EKFACFactors] = field(default_factory=dict)
    diag: Mapping[str, Tensor] = field(default_factory=dict)
    split: Mapping[str, SplitFactors] = field(default_factory=dict)
    exact: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the state covers, with its shape."""
        out: dict[str, tuple[int, ...]] = {}
        for info in self.layers.values():
            out.update(info.param_shapes)
        return out

    @property
    def other(self) -> tuple[str, ...]:
        return tuple(
            p for info in self.layers.values() if not info.kronecker for p in info.param_names
        )

    def num_stored(self) -> int:
        """Numbers stored: linear in the parameter count (p̄² + q² a layer)."""
        total = 0
        for group in (self.kfac, self.ekfac, self.split):
            for f in group.values():
                total += sum(t.numel() for t in vars(f).values() if t is not None)
        total += sum(t.numel() for t in self.exact.values())
        return total + sum(t.numel() for t in self.diag.values())

    # ---- serialisation -------------------------------------------------

    def tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Tensors by file name. Eigenbases stay float32 (or float64) even in
        a bf16 file: bf16 rotations are orthogonal to 3 digits only, which
        would distort ``U_Gᵀ Δ U_A`` far more than rounding ``s`` does."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ConfigError(f"factor dtype must be float32, bfloat16 or float64, got {dtype}")
        basis_dtype = torch.float64 if dtype is torch.float64 else torch.float32
        out: dict[str, Tensor] = {}
        for name, f in self.kfac.items():
            out[f"kfac/{name}/A"] = f.A.to(dtype)
            out[f"kfac/{name}/G"] = f.G.to(dtype)
        for name, e in self.ekfac.items():
            if e.UA is not None:
                out[f"ekfac/{name}/UA"] = e.UA.to(basis_dtype)
            out[f"ekfac/{name}/UG"] = e.UG.to(basis_dtype)
            out[f"ekfac/{name}/s"] = e.s.to(dtype)
        for pname, d in self.diag.items():
            out[f"diag/{pname}"] = d.to(dtype)
        for name, sp in self.split.items():
            for key, t in vars(sp).items():
                out[f"split/{name}/{key}"] = t.to(dtype)
        for name, f in self.exact.items():
            out[f"exact/{name}/F"] = f.to(dtype)
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "fisher": str(self.fisher),
            "n_examples": str(self.n_examples),
            "kinds": json.dumps([str(k) for k in self.kinds]),
            "include_other": json.dumps(self.include_other),
            "layers": json.dumps([info.to_json() for info in self.layers.values()]),
            "params": json.dumps({k: list(v) for k, v in self.param_shapes.items()}),
            "split": json.dumps(list(self.split)),
            "exact": json.dumps(list(self.exact)),
        }

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
        """Write a safetensors file (``kind = "curvature"``); factors in
        ``dtype`` (float32 by default, bfloat16 halves the size)."""
        _io.write(path, self.tensors(dtype), {**self.metadata(), "kind": "curvature"})

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None) -> CurvatureState:
        """Read a state written by ``save``; with ``model``, also check that
        every covered module exists there with the same shapes."""
        tensors, meta = _io.read(path, "curvature")
        state = cls.from_tensors(tensors, meta, path)
        if model is not None:
            state.validate(model)
        return state

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], meta: dict[str, str], path: str | Path = "<memory>"
    ) -> CurvatureState:
        try:
            fisher = FisherType(meta["fisher"])
            n_examples = int(meta["n_examples"])
            kinds = tuple(CurvatureKind(k) for k in _io.loads(meta, "kinds", path))
            include_other = bool(_io.loads(meta, "include_other", path))
            layers = {}
            for item in _io.loads(meta, "layers", path):
                info = LayerInfo(
                    name=item["name"],
                    rule=Rule(item["rule"]),
                    weight_shape=tuple(int(s) for s in item["weight_shape"]),
                    bias=bool(item["bias"]),
                )
                layers[info.name] = info
            # Format 1 had neither: its states load with the expand rule only.
            split_names = _io.loads(meta, "split", path) if "split" in meta else []
            exact_names = _io.loads(meta, "exact", path) if "exact" in meta else []
            unknown = [n for n in [*split_names, *exact_names] if n not in layers]
            if unknown:
                raise ValueError(f"split/exact blocks for unknown layer(s) {unknown}")
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: malformed curvature metadata ({exc})") from exc

        def take(key: str, shape: tuple[int, ...]) -> Tensor:
            if key not in tensors:
                raise CheckpointError(f"{path}: tensor {key!r} is missing")
            t = tensors.pop(key)
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {tuple(t.shape)}, header says {shape}"
                )
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: tensor {key!r} holds NaN or inf")
            # bf16 files are widened on load: penalties compute in float32+.
            return t.float() if t.dtype is torch.bfloat16 else t

        tensors = dict(tensors)
        kfac, ekfac, diag = {}, {}, {}
        for name, info in layers.items():
            if not info.kronecker:
                continue
            a_shape = (info.a_dim,) if info.rule is Rule.EMBEDDING else (info.a_dim,) * 2
            if CurvatureKind.KFAC in kinds:
                kfac[name] = KFACFactors(
                    A=take(f"kfac/{name}/A", a_shape),
                    G=take(f"kfac/{name}/G", (info.g_dim, info.g_dim)),
                )
            if CurvatureKind.EKFAC in kinds:
                emb = info.rule is Rule.EMBEDDING
                ekfac[name] = EKFACFactors(
                    UA=None if emb else take(f"ekfac/{name}/UA", a_shape),
                    UG=take(f"ekfac/{name}/UG", (info.g_dim, info.g_dim)),
                    s=take(
                        f"ekfac/{name}/s",
                        info.weight_shape if emb else (info.g_dim, info.a_dim),
                    ),
                )
        for info in layers.values():
            if CurvatureKind.DIAG in kinds or (include_other and not info.kronecker):
                for pname, shape in info.param_shapes.items():
                    diag[pname] = take(f"diag/{pname}", shape)
        split: dict[str, SplitFactors] = {}
        for name in split_names:
            info = layers[name]
            a2, g2 = (info.a_dim, info.a_dim), (info.g_dim, info.g_dim)
            split[name] = SplitFactors(
                A_mean=take(f"split/{name}/A_mean", a2),
                G_mean=take(f"split/{name}/G_mean", g2),
                A_dev=take(f"split/{name}/A_dev", a2),
                G_dev=take(f"split/{name}/G_dev", g2),
            )
        exact: dict[str, Tensor] = {}
        for name in exact_names:
            n = layers[name].a_dim * layers[name].g_dim
            exact[name] = take(f"exact/{name}/F", (n, n))
        if tensors:
            warnings.warn(
                f"{path}: ignoring {len(tensors)} unknown tensor(s), e.g. {next(iter(tensors))!r}",
                stacklevel=3,
            )
        return cls(
            fisher, n_examples, kinds, include_other, layers, kfac, ekfac, diag, split, exact
        )

    def validate(self, model: nn.Module) -> None:
        """Raise ``CheckpointError`` if a covered parameter is absent from
        ``model`` or has another shape; warn about trainable parameters of
        the model that the state leaves unprotected (a new head, say)."""
        params = dict(model.named_parameters())
        for pname, shape in self.param_shapes.items():
            if pname not in params:
                raise CheckpointError(
                    f"curvature covers parameter {pname!r}, which the model does not have"
                )
            if tuple(params[pname].shape) != shape:
                raise CheckpointError(
                    f"parameter {pname!r}: curvature expects shape {shape}, "
                    f"model has {tuple(params[pname].shape)}"
                )
        uncovered = [n for n, p in params.items() if p.requires_grad and n not in self.param_shapes]
        if uncovered:
            warnings.warn(
                f"{len(uncovered)} trainable parameter(s) have no curvature and will not be "
                f"penalised, e.g. {uncovered[0]!r}",
                stacklevel=2,
            )


@dataclass(frozen=True)
class TaskState:
    """What a finished task leaves behind (DESIGN.md section 1): its
    curvature, the anchor weights ``θ*`` and aggregate statistics (JSON
    values: task name, training-set size as λ's natural scale...). Never data.
    """

    curvature: CurvatureState
    anchor: Mapping[str, Tensor]
    stats: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls, model: nn.Module, curvature: CurvatureState, stats: Mapping[str, Any] | None = None
    ) -> TaskState:
        """Anchor on the model's current weights (copied to the CPU)."""
        curvature.validate(model)
        params = dict(model.named_parameters())
        anchor = {n: params[n].detach().to("cpu").clone() for n in curvature.param_shapes}
        return cls(curvature, anchor, dict(stats or {}))

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
        """One safetensors file (``kind = "task"``). Factors in ``dtype``;
        anchors always at the model's own precision, since rounding ``θ*``
        would put a spurious ``Δ`` into every penalty."""
        tensors = self.curvature.tensors(dtype)
        for pname, t in self.anchor.items():
            tensors[f"anchor/{pname}"] = t
        meta = {
            **self.curvature.metadata(),
            "kind": "task",
            "stats": json.dumps(dict(self.stats)),
        }
        _io.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None) -> TaskState:
        tensors, meta = _io.read(path, "task")
        anchor = {
            k.removeprefix("anchor/"): v for k, v in tensors.items() if k.startswith("anchor/")
        }
        rest = {k: v for k, v in tensors.items() if not k.startswith("anchor/")}
        curvature = CurvatureState.from_tensors(rest, meta, path)
        for pname, shape in curvature.param_shapes.items():
            if pname not in anchor:
                raise CheckpointError(f"{path}: anchor for {pname!r} is missing")
            if tuple(anchor[pname].shape) != shape:
                raise CheckpointError(
                    f"{path}: anchor {pname!r} has shape {tuple(anchor[pname].shape)}, "
                    f"expected {shape}"
                )
        stats = _io.loads(meta, "stats", path)
        state = cls(curvature, anchor, stats)
        if model is not None:
            curvature.validate(model)
        return state
