"""Penalties that keep a model near earlier tasks' solutions.

For prior task i with anchor ``θ*_i`` and ``Δ = θ - θ*_i`` (per layer
``Δ̄ = [ΔW, Δb]``, the bias as a last column), the penalty is
``Σ_i λ_i Ω_i(θ)`` with no factor ½ and F the mean (not summed) Fisher, so λ
keeps the paper's meaning (arXiv 2111.06012; DESIGN.md section 4):

- KFC (Martens & Grosse 2015 factors): per layer, the exact Fisher block
  ``vec(Δ̄)ᵀ F vec(Δ̄)`` where the state has one (small layers: the scoring
  head), else the candidate-aware split factors
  ``sum(Δ̄ ⊙ (G_mean Δ̄ A_mean)) + sum(Δ̄ ⊙ (G_dev Δ̄ A_dev))``, else (an
  Embedding, or a format-1 state) the expand factors ``sum(Δ̄ ⊙ (G Δ̄ A))`` =
  ``vec(Δ̄)ᵀ (A ⊗ G) vec(Δ̄)``: matrix products, never the Kronecker
  product. The split rule's mean factors have rank at most the number of
  queries they were estimated on; where that is under half their size they
  are used as ``B diag(λ) Bᵀ`` (``_low_rank``, once per penalty). An
  Embedding (weight (V, d) = W_linᵀ, diagonal A = a) gives
  ``sum(Δw ⊙ (Δw G) ⊙ a[:, None])``. ``kfc-expand`` is the paper's rule:
  expand factors everywhere.
- EKFAC (George et al. 2018): ``Ω = Σ_layers sum(s ⊙ (U_Gᵀ Δ̄ U_A)²)``;
  Embedding ``sum(s ⊙ (Δw U_G)²)``; the exact block where the state has
  one (``ekfac-expand``: never).
- EWC (Kirkpatrick et al. 2017): ``Ω = Σ_j F_jj Δ_j²``; L2: ``Σ_j Δ_j²``.

KFC and EKFAC add ``Σ F_jj Δ_j²`` for the parameters only a diagonal covers
(LayerNorm) when the state was estimated with ``include_other``. With no ½
in the penalty, the second-order forecast of how much task i's mean loss
rose is ``½ Ω_i`` (F standing in for the Hessian at ``θ*_i``):
``predicted_forgetting`` reports that, in nats per query.

Penalties are differentiable and computed on the model's device; factors and
anchors move there once, on the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn

from kronlink.curvature.state import CurvatureKind, Rule, TaskState
from kronlink.errors import CheckpointError, ConfigError

__all__ = [
    "DEFAULT_METHOD",
    "PENALTY_METHODS",
    "EKFACExpandPenalty",
    "EKFACPenalty",
    "EWCPenalty",
    "KFCExpandPenalty",
    "KFCPenalty",
    "L2Penalty",
    "NoPenalty",
    "Penalty",
    "PenaltyMethod",
    "build_penalty",
    "predicted_forgetting",
]


class PenaltyMethod(StrEnum):
    """The one list of penalty methods: every option, form and CLI choice imports it."""

    NONE = "none"
    L2 = "l2"
    EWC = "ewc"
    KFC = "kfc"  # exact blocks for small layers, the split rule elsewhere
    EKFAC = "ekfac"  # exact blocks for small layers, EKFAC elsewhere
    KFC_EXPAND = "kfc-expand"  # the paper's expand rule on every layer
    EKFAC_EXPAND = "ekfac-expand"  # EKFAC on every layer, no exact blocks


# What an update penalises with when the caller does not say: the rule that
# forgot least on the forgetting front of issue 13 (docs/curvature.md, "Which
# rule forgets least": at matched new-task accuracy the paper's expand rule
# kept 0.50 and 0.59 points more of the old task than the split rule with
# exact blocks, in two CNN experiments at CPU scale).
DEFAULT_METHOD = PenaltyMethod.KFC_EXPAND

# The methods that build a penalty against prior tasks (all but "none").
PENALTY_METHODS: tuple[str, ...] = tuple(m.value for m in PenaltyMethod if m != PenaltyMethod.NONE)


# One prior's Ω as a function of the model's parameters (by name).
_Term = Callable[[dict[str, Tensor]], Tensor]


class Penalty:
    """``penalty(model) = Σ_i λ_i Ω_i(θ)``. Subclasses define one task's
    ``Ω`` by ``_terms``: a list of closures over device-resident tensors."""

    method: PenaltyMethod

    def __init__(self, priors: Sequence[TaskState], lambdas: float | Sequence[float]) -> None:
        self.priors = list(priors)
        if isinstance(lambdas, int | float):
            lambdas = [float(lambdas)] * len(self.priors)
        self.lambdas = [float(v) for v in lambdas]
        if len(self.lambdas) != len(self.priors):
            raise ConfigError(
                f"one λ per prior task expected: {len(self.priors)} prior(s), "
                f"{len(self.lambdas)} λ value(s)"
            )
        if any(not (v >= 0 and v < float("inf")) for v in self.lambdas):
            raise ConfigError(f"λ must be finite and >= 0, got {self.lambdas}")
        for prior in self.priors:
            self._check(prior)
        self._cache: tuple[torch.device, torch.dtype, list[list[_Term]]] | None = None

    def _check(self, prior: TaskState) -> None:
        """Raise ``ConfigError`` if ``prior`` lacks what this method needs."""

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        raise NotImplementedError

    def _prepared(self, model: nn.Module) -> tuple[dict[str, Tensor], list[list[_Term]]]:
        params = dict(model.named_parameters())
        ref = next(iter(params.values()))
        # float64 models get float64 penalties; anything else float32 (bf16
        # would round Δ = θ - θ* to nothing).
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        if self._cache is None or self._cache[:2] != (ref.device, dtype):
            for prior in self.priors:
                prior.curvature.validate(model)
                for name in prior.anchor:
                    if name not in params:
                        raise CheckpointError(f"anchor parameter {name!r} is not in the model")

            def to(t: Tensor) -> Tensor:
                return t.to(device=ref.device, dtype=dtype)

            self._cache = (ref.device, dtype, [self._terms(p, to) for p in self.priors])
        cast = {n: p.to(dtype) for n, p in params.items()}
        return cast, self._cache[2]

    def omegas(self, model: nn.Module) -> list[Tensor]:
        """``Ω_i(θ)`` per prior task, differentiable."""
        params, terms = self._prepared(model)
        ref = next(iter(params.values()))
        return [sum((t(params) for t in ts), ref.new_zeros(())) for ts in terms]

    def __call__(self, model: nn.Module) -> Tensor:
        omegas = self.omegas(model)
        if not omegas:
            return next(model.parameters()).new_zeros(())
        return sum(lam * om for lam, om in zip(self.lambdas, omegas, strict=True))

    @torch.no_grad()
    def per_task(self, model: nn.Module) -> list[float]:
        """``Ω_i(θ)`` per prior (without λ): the penalty's own terms, twice
        the forecast loss increase (see ``predicted_forgetting``)."""
        return [float(om) for om in self.omegas(model)]


def _delta(params: dict[str, Tensor], anchor: dict[str, Tensor], name: str) -> Tensor:
    return params[name] - anchor[name] if anchor else params[name]


def _live_rows(weight: Tensor) -> Tensor | None:
    """Indices of the rows of ``weight`` that hold a nonzero, when fewer than
    half do (else None).

    An embedding's curvature is zero on every token the prior task never
    used, and those rows contribute exactly nothing to Ω; skipping them is
    exact. It matters: AdamW's weight decay moves all 30,522 rows of the
    word embedding every step, so without this the embedding term costs a
    (V x d) @ (d x d) product a step for a few thousand live rows.
    """
    if weight.dim() < 2:
        return None
    live = weight.reshape(weight.shape[0], -1).ne(0).any(dim=1)
    if int(live.sum()) * 2 >= weight.shape[0]:
        return None
    return live.nonzero().squeeze(1)


def _rows(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


class _GatherRows(torch.autograd.Function):
    """``weight.index_select(0, rows)`` whose gradient is sparse (the rows only).

    ``index_select``'s own backward fills a dense (V, d) zero gradient and
    the autograd engine then adds it to the model's dense embedding
    gradient: three passes over 30,522 rows a step for the few hundred a
    prior task used. That cost 5 ms of a CNN step (issue 14). A sparse
    gradient is added into the dense one row by row. The model's forward
    always gives its embeddings a dense gradient, so ``.grad`` stays dense
    for the optimiser; a gradient of the penalty alone is sparse.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.shape, ctx.dtype = weight.shape, weight.dtype
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        # rows come sorted and unique from nonzero(): a coalesced index
        # the engine does not convert a sparse gradient's dtype, so it comes
        # in the weight's (a float64 anchor makes ``grad`` float64)
        sparse = torch.sparse_coo_tensor(
            rows.unsqueeze(0),
            grad.to(ctx.dtype),
            ctx.shape,
            is_coalesced=True,
            check_invariants=False,
        )
        return sparse, None


def _param_rows(t: Tensor, rows: Tensor | None) -> Tensor:
    """A parameter's rows, differentiably, with a sparse gradient."""
    return t if rows is None else _GatherRows.apply(t, rows)


def _diag_terms(
    prior: TaskState, to: Callable[[Tensor], Tensor], names: Sequence[str]
) -> list[_Term]:
    full = {n: to(prior.curvature.diag[n]) for n in names}
    rows = {n: _live_rows(f) for n, f in full.items()}
    anchor = {n: _rows(to(prior.anchor[n]), rows[n]) for n in names}
    fisher = {n: _rows(f, rows[n]) for n, f in full.items()}

    def term(params: dict[str, Tensor]) -> Tensor:
        return sum(
            (
                ((_param_rows(params[n], rows[n]) - anchor[n]).square() * fisher[n]).sum()
                for n in names
            ),
            params[names[0]].new_zeros(()),
        )

    return [term] if names else []


class NoPenalty(Penalty):
    """Zero. ``per_task`` reports 0 for every prior."""

    method = PenaltyMethod.NONE

    def __init__(self, priors: Sequence[TaskState] = (), lambdas: float | Sequence[float] = 0.0):
        super().__init__(priors, lambdas)

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        return []

    def _prepared(self, model: nn.Module) -> tuple[dict[str, Tensor], list[list[_Term]]]:
        return dict(model.named_parameters()), [[] for _ in self.priors]


class L2Penalty(Penalty):
    """``Ω = Σ_j Δ_j²`` over the anchored parameters."""

    method = PenaltyMethod.L2

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        anchor = {n: to(t) for n, t in prior.anchor.items()}

        def term(params: dict[str, Tensor]) -> Tensor:
            return sum(
                (_delta(params, anchor, n).square().sum() for n in anchor),
                params[next(iter(anchor))].new_zeros(()),
            )

        return [term] if anchor else []


class EWCPenalty(Penalty):
    """``Ω = Σ_j F_jj Δ_j²`` with the diagonal of the mean Fisher."""

    method = PenaltyMethod.EWC

    def _check(self, prior: TaskState) -> None:
        if CurvatureKind.DIAG not in prior.curvature.kinds:
            raise ConfigError("EWC needs a diagonal Fisher: estimate with kinds including 'diag'")

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        return _diag_terms(prior, to, list(prior.curvature.diag))


class KFCPenalty(Penalty):
    """``Ω = Σ_layers vec(Δ̄)ᵀ F_layer vec(Δ̄)`` with the exact block, the
    split factors or ``A ⊗ G``, in that order of preference (``expand``:
    ``A ⊗ G`` only). One term per layer of ``kfac``, in its order."""

    method = PenaltyMethod.KFC
    expand = False

    def _check(self, prior: TaskState) -> None:
        if CurvatureKind.KFAC not in prior.curvature.kinds:
            raise ConfigError("KFC needs Kronecker factors: estimate with kinds including 'kfac'")

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        terms: list[_Term] = []
        quads: list[_Quad] = []
        for _, part in self._layer_parts(prior, to):
            (quads if isinstance(part, _Quad) else terms).append(part)
        return terms + _grouped_kfc(quads) + _other_terms(prior, to)

    def _layer_parts(
        self, prior: TaskState, to: Callable[[Tensor], Tensor]
    ) -> list[tuple[str, _Term | _Quad]]:
        """Each Kronecker layer's Ω: a term, or a ``_Quad`` that ``_terms``
        batches with the layers of equal shapes."""
        cs = prior.curvature
        parts: list[tuple[str, _Term | _Quad]] = []
        for name, f in cs.kfac.items():
            info = cs.layers[name]
            anchor = {n: to(prior.anchor[n]) for n in info.param_names}
            part: _Term | _Quad
            if info.rule is Rule.EMBEDDING:
                part = _kfc_embedding(info.param_names[0], anchor, to(f.A), to(f.G))
            elif not self.expand and name in cs.exact:
                part = _exact(info.param_names, anchor, to(cs.exact[name]))
            elif not self.expand and name in cs.split:
                sp = cs.split[name]
                pairs = [(to(sp.A_mean), to(sp.G_mean)), (to(sp.A_dev), to(sp.G_dev))]
                part = _Quad(tuple(info.param_names), anchor, pairs, (cs.n_examples, None))
            else:
                part = _Quad(tuple(info.param_names), anchor, [(to(f.A), to(f.G))])
            parts.append((name, part))
        return parts

    @torch.no_grad()
    def by_layer(self, model: nn.Module, prior: int = 0) -> dict[str, float]:
        """Ω of prior task ``prior`` (without λ) split by Kronecker layer,
        plus ``"(diagonal-only parameters)"``: the parts add up to
        ``per_task(model)[prior]`` (``_terms`` batches layers of equal
        shapes into one term, which mixes them)."""
        params = self._prepared(model)[0]
        ref = next(iter(params.values()))

        def to(t: Tensor) -> Tensor:
            return t.to(device=ref.device, dtype=ref.dtype)

        task = self.priors[prior]
        out = {}
        for name, part in self._layer_parts(task, to):
            if isinstance(part, _Quad):
                part = _kfc_split(part.names, part.anchor, part.pairs)
            out[name] = float(part(params))
        other = _other_terms(task, to)
        if other:
            out["(diagonal-only parameters)"] = float(other[0](params))
        return out


class KFCExpandPenalty(KFCPenalty):
    """The paper's KFC: ``sum(Δ̄ ⊙ (G Δ̄ A))`` with the expand factors."""

    method = PenaltyMethod.KFC_EXPAND
    expand = True


class EKFACPenalty(Penalty):
    """``Ω = Σ_layers sum(s ⊙ (U_Gᵀ Δ̄ U_A)²)``, the exact block where the
    state has one (``expand``: never)."""

    method = PenaltyMethod.EKFAC
    expand = False

    def _check(self, prior: TaskState) -> None:
        if CurvatureKind.EKFAC not in prior.curvature.kinds:
            raise ConfigError("EKFAC penalty needs kinds including 'ekfac'")

    def _terms(self, prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
        cs = prior.curvature
        terms: list[_Term] = []
        for name, e in cs.ekfac.items():
            info = cs.layers[name]
            anchor = {n: to(prior.anchor[n]) for n in info.param_names}
            UG, s = to(e.UG), to(e.s)
            if info.rule is Rule.EMBEDDING:
                terms.append(_ekfac_embedding(info.param_names[0], anchor, UG, s))
            elif not self.expand and name in cs.exact:
                terms.append(_exact(info.param_names, anchor, to(cs.exact[name])))
            else:
                terms.append(_ekfac_linear(info.param_names, anchor, to(e.UA), UG, s))
        return terms + _other_terms(prior, to)


class EKFACExpandPenalty(EKFACPenalty):
    """EKFAC on every layer, as before exact blocks existed."""

    method = PenaltyMethod.EKFAC_EXPAND
    expand = True


def _other_terms(prior: TaskState, to: Callable[[Tensor], Tensor]) -> list[_Term]:
    if not prior.curvature.include_other:
        return []
    return _diag_terms(prior, to, list(prior.curvature.other))


def _bar(params: dict[str, Tensor], anchor: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """``Δ̄ = [ΔW.reshape(q, -1), Δb]`` (q, p̄)."""
    dw = _delta(params, anchor, names[0])
    dw = dw.reshape(dw.shape[0], -1)
    if len(names) == 1:
        return dw
    return torch.cat([dw, _delta(params, anchor, names[1])[:, None]], dim=1)


@dataclass(frozen=True)
class _Quad:
    """One layer's ``Σ_k sum(Δ̄ ⊙ (G_k Δ̄ A_k))`` (k = 1: expand, 2: split)."""

    names: tuple[str, ...]
    anchor: dict[str, Tensor]
    pairs: list[tuple[Tensor, Tensor]]  # (A, G)
    # An upper bound on the rank of both factors of each pair, where the
    # estimator guarantees one (the split rule's mean pair: a sum of one
    # outer product per query, so rank <= n_examples), else None.
    ranks: tuple[int | None, ...] = ()


def _symmetric(t: Tensor) -> bool:
    return bool((t - t.mT).abs().max() <= 1e-6 * t.abs().max())


# Extra columns of the range finder in ``_low_rank`` beyond the rank bound.
_OVERSAMPLE = 8


def _low_rank(t: Tensor, rank: int) -> tuple[Tensor, Tensor] | None:
    """``(B, λ)`` with ``t = B diag(λ) Bᵀ`` to rounding, B (n, r) with
    orthonormal columns, for a symmetric ``t`` of rank at most ``rank``;
    None where that would not save work (r > n / 2) or ``t`` is not of low
    rank after all (a state built by hand: then the full factor is used).

    A range finder on a fixed Gaussian sketch (n² r, no n³ eigensolver: the
    FFN factors are 1536 wide and this runs once per penalty), then the
    small (r, r) eigenproblem, in float64. The directions it drops are the
    float32 factor's rounding noise: the exact factor has no others.
    """
    n, r = t.shape[0], rank + _OVERSAMPLE
    if 2 * r > n:
        return None
    x = t.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    sketch = torch.randn(n, r, generator=gen, dtype=torch.float64).to(x.device)
    q = torch.linalg.qr(x @ sketch).Q
    lam, v = torch.linalg.eigh(q.mT @ x @ q)
    b = q @ v
    err = (x - (b * lam) @ b.mT).norm()
    if err > 64 * torch.finfo(t.dtype).eps * x.norm():
        return None
    return b.to(t.dtype), lam.to(t.dtype)


@dataclass(frozen=True)
class _LowRankSlot:
    """One pair slot of a group of layers, with each factor either full
    (``*_lam`` None: ``G`` (L, q, q)) or as ``B diag(λ) Bᵀ`` (``G`` holds B
    (L, q, r), ``g_lam`` λ (L, r)); likewise ``A``."""

    G: Tensor
    g_lam: Tensor | None
    A: Tensor
    a_lam: Tensor | None


@dataclass(frozen=True)
class _GroupPlan:
    """A group's pairs: the full ones stacked as (L, k, ·, ·) (None if
    none), the low-rank ones slot by slot."""

    G: Tensor | None
    A: Tensor | None
    low: tuple[_LowRankSlot, ...]


class _QuadraticForm(torch.autograd.Function):
    """``Σ sum(D ⊙ M)`` with ``M = Σ_k G_k D A_k`` per layer of a stack.

    Autograd of the plain expression recomputes both products for the
    gradient; with symmetric factors the gradient is ``2 M``, which the
    forward already has: half the products per step (issue 14).

    A low-rank factor ``G = B diag(λ) Bᵀ`` turns its pair's term into
    ``sum(E ⊙ (λ_G E λ_A))`` with ``E = Bᵀ D`` (and ``D B`` on the A side),
    and its part of M into ``B (λ_G E λ_A) Bᵀ``: r/q of the products for a
    factor of rank r. The split rule's mean pair has rank at most the
    number of queries, which left its step 1.15x the plain step when taken
    as full (issue 14).
    """

    @staticmethod
    def forward(ctx: Any, d: Tensor, plan: _GroupPlan) -> Tensor:
        M = None
        if plan.G is not None:
            M = (plan.G @ d.unsqueeze(1) @ plan.A).sum(1)
        total = d.new_zeros(()) if M is None else (d * M).sum()
        for s in plan.low:
            E = d if s.g_lam is None else s.G.mT @ d
            E = E if s.a_lam is None else E @ s.A
            N = s.G @ E if s.g_lam is None else s.g_lam[..., :, None] * E
            N = N @ s.A if s.a_lam is None else N * s.a_lam[..., None, :]
            total = total + (E * N).sum()
            if ctx.needs_input_grad[0]:
                back = N if s.g_lam is None else s.G @ N
                back = back if s.a_lam is None else back @ s.A.mT
                M = back if M is None else M + back
        ctx.save_for_backward(M)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (M,) = ctx.saved_tensors
        return M * (2 * grad), None


def _plan(members: Sequence[_Quad]) -> _GroupPlan:
    """Stack a group's factors; a pair slot's factor goes low rank where the
    estimator bounds its rank and every member's factorisation succeeds."""
    full_g, full_a, low = [], [], []
    for k in range(len(members[0].pairs)):
        sides = []
        for side in (1, 0):  # G, then A
            mats = [m.pairs[k][side] for m in members]
            bound = members[0].ranks[k] if members[0].ranks else None
            facts = [_low_rank(t, bound) for t in mats] if bound is not None else [None]
            if all(f is not None for f in facts):
                sides.append(
                    (torch.stack([b for b, _ in facts]), torch.stack([v for _, v in facts]))
                )
            else:
                sides.append((torch.stack(mats), None))
        (G, g_lam), (A, a_lam) = sides
        if g_lam is None and a_lam is None:
            full_g.append(G)
            full_a.append(A)
        else:
            low.append(_LowRankSlot(G, g_lam, A, a_lam))
    return _GroupPlan(
        torch.stack(full_g, 1) if full_g else None,
        torch.stack(full_a, 1) if full_a else None,
        tuple(low),
    )


def _grouped_kfc(quads: Sequence[_Quad]) -> list[_Term]:
    """One term per group of layers whose Δ̄ and factors have equal shapes
    (a transformer's layers repeat): one batched product per group instead
    of one per layer. Operands are stacked here, once per penalty, not per
    step: the anchors as one (L, q, p̄) tensor, the factors as (L, k, ·, ·)
    (low-rank ones as ``_LowRankSlot``)."""
    groups: dict[tuple, list[_Quad]] = {}
    for quad in quads:
        w = quad.anchor[quad.names[0]]
        key = (w.shape[0], w[0].numel(), len(quad.names), len(quad.pairs), quad.ranks)
        groups.setdefault(key, []).append(quad)
    terms = []
    for members in groups.values():
        names = [m.names for m in members]
        anchor = torch.stack([_bar(m.anchor, {}, m.names) for m in members])
        A = torch.stack([torch.stack([a for a, _ in m.pairs]) for m in members])
        G = torch.stack([torch.stack([g for _, g in m.pairs]) for m in members])
        if _symmetric(A) and _symmetric(G):
            terms.append(_fused_term(names, anchor, _plan(members)))
        else:
            terms.append(_stacked_term(names, anchor, A, G))
    return terms


def _fused_term(names: list[tuple[str, ...]], anchor: Tensor, plan: _GroupPlan) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        d = torch.stack([_bar(params, {}, n) for n in names]) - anchor
        return _QuadraticForm.apply(d, plan)

    return term


def _stacked_term(names: list[tuple[str, ...]], anchor: Tensor, A: Tensor, G: Tensor) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        d = torch.stack([_bar(params, {}, n) for n in names]) - anchor
        return (d * (G @ d.unsqueeze(1) @ A).sum(1)).sum()

    return term


def _kfc_linear(names: Sequence[str], anchor: dict[str, Tensor], A: Tensor, G: Tensor) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        d = _bar(params, anchor, names)
        return (d * (G @ d @ A)).sum()

    return term


def _kfc_split(
    names: Sequence[str], anchor: dict[str, Tensor], pairs: Sequence[tuple[Tensor, Tensor]]
) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        d = _bar(params, anchor, names)
        return sum(((d * (G @ d @ A)).sum() for A, G in pairs), d.new_zeros(()))

    return term


def _exact(names: Sequence[str], anchor: dict[str, Tensor], F: Tensor) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        v = _bar(params, anchor, names).T.reshape(-1)  # column-stacking vec
        return v @ (F @ v)

    return term


def _kfc_embedding(name: str, anchor: dict[str, Tensor], a: Tensor, G: Tensor) -> _Term:
    # weight (V, d) is W_linᵀ of y = W_lin onehot(v); with Δ_lin = Δwᵀ,
    # sum(Δ_lin ⊙ (G Δ_lin diag a)) = sum(Δw ⊙ (Δw G) ⊙ a[:, None]) (G symmetric).
    # Only tokens the prior task used (a > 0) can contribute.
    rows = a.nonzero().squeeze(1)
    a_live, w_star = a.index_select(0, rows)[:, None], anchor[name].index_select(0, rows)

    def term(params: dict[str, Tensor]) -> Tensor:
        d = _GatherRows.apply(params[name], rows) - w_star
        return (d * (d @ G) * a_live).sum()

    return term


def _ekfac_linear(
    names: Sequence[str], anchor: dict[str, Tensor], UA: Tensor, UG: Tensor, s: Tensor
) -> _Term:
    def term(params: dict[str, Tensor]) -> Tensor:
        d = _bar(params, anchor, names)
        return (s * (UG.T @ d @ UA).square()).sum()

    return term


def _ekfac_embedding(name: str, anchor: dict[str, Tensor], UG: Tensor, s: Tensor) -> _Term:
    # (U_Gᵀ Δ_lin)ᵀ = Δw U_G, with s stored in the weight's (V, d) orientation;
    # rows of s that are zero (tokens the prior task never used) add nothing.
    rows = _live_rows(s)
    s_live, w_star = _rows(s, rows), _rows(anchor[name], rows)

    def term(params: dict[str, Tensor]) -> Tensor:
        d = _param_rows(params[name], rows) - w_star
        return (s_live * (d @ UG).square()).sum()

    return term


_METHODS: dict[PenaltyMethod, type[Penalty]] = {
    PenaltyMethod.NONE: NoPenalty,
    PenaltyMethod.L2: L2Penalty,
    PenaltyMethod.EWC: EWCPenalty,
    PenaltyMethod.KFC: KFCPenalty,
    PenaltyMethod.EKFAC: EKFACPenalty,
    PenaltyMethod.KFC_EXPAND: KFCExpandPenalty,
    PenaltyMethod.EKFAC_EXPAND: EKFACExpandPenalty,
}


def build_penalty(
    method: PenaltyMethod | str,
    priors: Sequence[TaskState],
    lambdas: float | Sequence[float],
) -> Penalty:
    """The penalty for ``method`` (a ``PenaltyMethod`` value) over
    ``priors``, with one λ per prior (or one λ for all)."""
    try:
        m = PenaltyMethod(method)
    except ValueError as exc:
        choices = ", ".join(repr(str(v)) for v in PenaltyMethod)
        raise ConfigError(f"penalty method must be one of {choices}, got {method!r}") from exc
    return _METHODS[m](priors, lambdas)


def predicted_forgetting(model: nn.Module, priors: Sequence[TaskState]) -> list[float]:
    """``½ Ω_i(θ)`` under each prior's best available curvature (KFC, else
    EKFAC, else EWC): the second-order, data-free forecast of how much task
    i's mean loss per query rose (nats), whatever penalty the training used.
    The ½ is the Taylor expansion's: ``Ω`` (the penalty term) has none."""
    out = []
    for prior in priors:
        kinds = prior.curvature.kinds
        method = (
            PenaltyMethod.KFC
            if CurvatureKind.KFAC in kinds
            else PenaltyMethod.EKFAC
            if CurvatureKind.EKFAC in kinds
            else PenaltyMethod.EWC
        )
        out.extend(0.5 * om for om in build_penalty(method, [prior], 1.0).per_task(model))
    return out
