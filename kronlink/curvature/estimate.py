"""``estimate_curvature``: KFAC, EKFAC and diagonal Fisher of a ranker.

One pass over the batches computes ``A``, ``G`` and the diagonal Fisher;
EKFAC's scalings ``s = E_n[(U_Gᵀ ∇W̄_n U_A)²]`` need the eigenbases of the
finished ``A`` and ``G``, so they take a second pass (George et al. 2018,
Algorithm 1 re-estimates them the same way).

Each pass runs the ranker forward once a batch with hooks on every covered
module, takes the loss with ``reduction="sum"`` (so autograd's gradient at
each position is ``g_t = ∂ℓ_n/∂y_t`` unscaled; a batch mean would give
``g/B``), and asks autograd for the gradients of the recorded outputs. Per-
example quantities are formed by grouping positions by example; no loop
runs over single examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kronlink.curvature import factors as fx
from kronlink.curvature._hooks import Call, plan, recording
from kronlink.curvature._positions import Positions, module_positions, shared_inputs
from kronlink.curvature.state import (
    CurvatureKind,
    CurvatureState,
    EKFACFactors,
    FisherType,
    KFACFactors,
    LayerInfo,
    Rule,
    SplitFactors,
)
from kronlink.errors import ConfigError, UnsupportedModuleError
from kronlink.models.base import (
    Ranker,
    RankerBatch,
    masked_log_softmax,
    ranking_loss,
)

__all__ = ["estimate_curvature"]

Progress = Callable[[int, int | None], None]


@dataclass
class _Acc:
    """Running sums for one module."""

    info: LayerInfo
    module: nn.Module
    a: Tensor | None = None  # Σ x̄x̄ᵀ, or token counts for an Embedding
    positions: int = 0  # number of real positions summed into ``a``
    g: Tensor | None = None  # Σ g gᵀ
    diag: Tensor | None = None  # Σ_n (∇W̄_n)², shaped like W̄ (or the weight)
    diag_bias: Tensor | None = None  # LayerNorm only
    s: Tensor | None = None  # Σ_n (U_Gᵀ ∇W̄_n U_A)²
    ua: Tensor | None = None
    ug: Tensor | None = None
    sums: dict[str, Tensor] | None = None  # a_dev, g_dev of fx.split_sums (Linear, Conv1d)
    means: dict[str, fx.MeanSums] | None = None  # their a_rows, g_rows
    exact: Tensor | None = None  # Σ_n vec ∇W̄_n vec ∇W̄_nᵀ (small layers)
    calls: int = 0

    @classmethod
    def zeros(
        cls, info: LayerInfo, module: nn.Module, want_diag: bool, exact_max: int, **kw
    ) -> _Acc:
        """Preallocated sums, so a layer that saw no real position still has
        (zero) factors. Memory: p̄² + q² (and twice that for the mean parts
        once a pass has seen as many queries as the layer is wide, see
        ``fx.MeanSums``) + (with the diagonal) the weight + (q·p̄)² for a
        layer with an exact block."""
        acc = cls(info, module)
        if info.rule is Rule.LAYERNORM:
            acc.diag = torch.zeros(info.weight_shape, **kw).reshape(-1)
            acc.diag_bias = torch.zeros_like(acc.diag) if info.bias else None
            return acc
        if info.rule is Rule.EMBEDDING:
            acc.a = torch.zeros(info.a_dim, **kw)
            acc.diag = torch.zeros(info.weight_shape, **kw) if want_diag else None
        else:
            p, q = info.a_dim, info.g_dim
            acc.diag = torch.zeros(q, p, **kw) if want_diag else None
            acc.sums = {"a_dev": torch.zeros(p, p, **kw), "g_dev": torch.zeros(q, q, **kw)}
            acc.means = {"a_rows": fx.MeanSums(p, **kw), "g_rows": fx.MeanSums(q, **kw)}
            if p * q <= exact_max:
                acc.exact = torch.zeros(p * q, p * q, **kw)
            return acc
        acc.g = torch.zeros(info.g_dim, info.g_dim, **kw)
        return acc


def estimate_curvature(
    model: Ranker,
    batches: Iterable[RankerBatch],
    *,
    kinds: Sequence[str] = ("kfac", "ekfac", "diag"),
    fisher: FisherType | str = "empirical",
    include_other: bool = True,
    exact_max_params: int = 1024,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> CurvatureState:
    """Estimate the curvature of ``model`` on ``batches`` (DESIGN.md section 4).

    For each Linear, Conv1d and Embedding (``y = W̄ x̄`` at positions t):

    - ``A = mean over real (n, t) of x̄ x̄ᵀ`` (Embedding: the diagonal, token
      counts / real positions; Conv1d: ``x̄`` is the unfolded patch),
    - ``G = mean over n of Σ_t g_t g_tᵀ`` with ``g_t = ∂ℓ_n/∂y_t``
      (positions treated as independent: the "expand" rule), so that
      ``F ≈ A ⊗ G``, exact for one example at one position,
    - ``diag F = E_n[(∇W̄_n)²]``, ``∇W̄_n = Σ_t g_t x̄_tᵀ``,
    - EKFAC (second pass): ``s = E_n[(U_Gᵀ ∇W̄_n U_A)²]``,
    - Linear and Conv1d also get the candidate-aware "split" factors
      (``SplitFactors``: reduce over a query's mean, expand over the
      deviations from it) and, when ``q·p̄ <= exact_max_params`` (the scoring
      head, small layers; 0 turns it off), the exact Fisher block
      ``E_n[vec ∇W̄_n vec ∇W̄_nᵀ]``, both from the same per-query sums.

    LayerNorm gets ``E_n[(∇θ_n)²]`` with ``∇weight_n = Σ_t g_t ⊙ x̂_t`` and
    ``∇bias_n = Σ_t g_t``, when ``include_other`` or ``"diag"`` is asked
    for. ``ℓ_n`` is the ranking loss of query n with its gold label
    (``fisher="empirical"``, the paper's eq. 3; queries with label -1 are
    skipped) or with a label sampled from the model's own masked softmax
    (``fisher="true"``, using ``generator``; EKFAC's second pass samples
    afresh). Padding positions (``token_layouts``) are left out of every sum.

    The model runs in eval mode (dropout off) and is restored afterwards;
    factors are accumulated in float64 for a float64 model, else float32, and
    returned on the CPU. ``batches`` must be re-iterable when EKFAC is asked
    for. ``progress(step, total)`` is called after every batch.

    Raises ``UnsupportedModuleError`` for a module with parameters and no
    rule, ``ConfigError`` for bad options or a missing token layout.
    """
    kinds_t = _parse_kinds(kinds)
    try:
        fisher_t = FisherType(fisher)
    except ValueError as exc:
        raise ConfigError(f"fisher must be 'empirical' or 'true', got {fisher!r}") from exc
    planned = plan(model)
    if not planned:
        raise ConfigError("the model has no trainable parameters")
    want_diag = CurvatureKind.DIAG in kinds_t
    kron = CurvatureKind.KFAC in kinds_t or CurvatureKind.EKFAC in kinds_t
    planned = {
        name: (m, info)
        for name, (m, info) in planned.items()
        if (info.kronecker and (kron or want_diag))
        or (not info.kronecker and (include_other or want_diag))
    }
    two_pass = CurvatureKind.EKFAC in kinds_t
    if two_pass and iter(batches) is batches:
        raise ConfigError(
            "EKFAC needs two passes over the batches; pass a list or a DataLoader, not an iterator"
        )
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    acc_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    kw = {"dtype": acc_dtype, "device": device}
    if exact_max_params < 0:
        raise ConfigError(f"exact_max_params must be >= 0, got {exact_max_params}")
    exact_max = exact_max_params if kron else 0
    accs = {
        name: _Acc.zeros(info, m, want_diag, exact_max, **kw) for name, (m, info) in planned.items()
    }
    try:
        total = len(batches) * (2 if two_pass else 1)  # type: ignore[arg-type]
    except TypeError:
        total = None

    was_training = model.training
    model.eval()
    try:
        step = 0
        n_examples = 0

        work = fx.Workspace()

        def first(name: str, pos: Positions, n_queries: int, cache: dict) -> None:
            _first_pass(accs[name], pos, n_queries, want_diag, cache, work)

        for valid in _passes(model, batches, accs, fisher_t, device, generator, first, acc_dtype):
            n_examples += int(valid.sum())
            step += 1
            if progress is not None:
                progress(step, total)
        never = [n for n, a in accs.items() if a.calls == 0]
        if never and n_examples:
            raise UnsupportedModuleError(
                f"module(s) {never} own trainable parameters but their forward never ran "
                "(their weights are used directly elsewhere, as in MultiheadAttention), "
                "so no curvature rule applies"
            )
        if n_examples == 0:
            raise ConfigError("no batch held an example with a label; the Fisher is undefined")

        kfac: dict[str, KFACFactors] = {}
        ekfac: dict[str, EKFACFactors] = {}
        diag: dict[str, Tensor] = {}
        split: dict[str, SplitFactors] = {}
        exact: dict[str, Tensor] = {}
        for name, acc in accs.items():
            info = acc.info
            if info.kronecker:
                npos = max(acc.positions, 1)
                if acc.sums is None:
                    A, G = acc.a / npos, acc.g / n_examples
                else:
                    sm = acc.sums
                    a_red, a_wm = acc.means["a_rows"].result()
                    g_red, g_wm = acc.means["g_rows"].result()
                    acc.means = None
                    A = (sm["a_dev"] + a_wm) / npos
                    G = (sm["g_dev"] + g_wm) / n_examples
                if CurvatureKind.KFAC in kinds_t:
                    kfac[name] = KFACFactors(A=A.cpu(), G=G.cpu())
                    if acc.sums is not None:
                        split[name] = SplitFactors(
                            A_mean=(a_red / n_examples).cpu(),
                            G_mean=(g_red / n_examples).cpu(),
                            A_dev=(acc.sums["a_dev"] / npos).cpu(),
                            G_dev=(acc.sums["g_dev"] / n_examples).cpu(),
                        )
                if acc.exact is not None:
                    exact[name] = (acc.exact / n_examples).cpu()
                if two_pass:
                    acc.ug = fx.symmetric_eigenbasis(G)
                    emb = info.rule is Rule.EMBEDDING
                    acc.ua = None if emb else fx.symmetric_eigenbasis(A)
                    shape = info.weight_shape if emb else (info.g_dim, info.a_dim)
                    acc.s = torch.zeros(shape, **kw)
            if acc.diag is not None:
                diag.update(_split_diag(info, acc, n_examples))

        if two_pass:
            n_second = 0

            def second(name: str, pos: Positions, n_queries: int, cache: dict) -> None:
                _second_pass(accs[name], pos, n_queries)

            for valid in _passes(
                model,
                batches,
                accs,
                fisher_t,
                device,
                generator,
                second,
                acc_dtype,
                kronecker_only=True,
            ):
                n_second += int(valid.sum())
                step += 1
                if progress is not None:
                    progress(step, total)
            for name, acc in accs.items():
                if acc.info.kronecker:
                    ekfac[name] = EKFACFactors(
                        UA=acc.ua.cpu() if acc.ua is not None else None,
                        UG=acc.ug.cpu(),
                        s=(acc.s / max(n_second, 1)).cpu(),
                    )
    finally:
        model.train(was_training)

    layers = {name: acc.info for name, acc in accs.items()}
    if not want_diag:
        # Only the "other" parameters keep a diagonal (their only curvature).
        diag = {k: v for k, v in diag.items() if not _is_kron_param(k, layers)}
    return CurvatureState(
        fisher=fisher_t,
        n_examples=n_examples,
        kinds=kinds_t,
        include_other=include_other,
        layers=layers,
        kfac=kfac,
        ekfac=ekfac,
        diag=diag,
        split=split,
        exact=exact,
    )


def _parse_kinds(kinds: Sequence[str]) -> tuple[CurvatureKind, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        out = tuple(dict.fromkeys(CurvatureKind(k) for k in kinds))
    except ValueError as exc:
        raise ConfigError(f"kinds must be among 'kfac', 'ekfac', 'diag', got {kinds!r}") from exc
    if not out:
        raise ConfigError("kinds is empty")
    return out


def _is_kron_param(pname: str, layers: dict[str, LayerInfo]) -> bool:
    return any(info.kronecker and pname in info.param_names for info in layers.values())


# ---- one forward/backward per batch --------------------------------------


Reduce = Callable[[str, Positions, int, dict], None]


def _passes(
    model: Ranker,
    batches: Iterable[RankerBatch],
    accs: dict[str, _Acc],
    fisher: FisherType,
    device: torch.device,
    generator: torch.Generator | None,
    reduce: Reduce,
    dtype: torch.dtype,
    kronecker_only: bool = False,
) -> Iterator[Tensor]:
    """Run every batch; yield its ``valid`` mask (queries with a label)
    after ``reduce`` has taken each watched module's positions."""
    watched = {n: a.module for n, a in accs.items() if a.info.kronecker or not kronecker_only}
    for batch in batches:
        # enable_grad: the caller may hold torch.no_grad() (an evaluation loop).
        with torch.enable_grad():
            yield _one_batch(
                model, batch.to(device), watched, accs, fisher, generator, reduce, dtype
            )


def _one_batch(
    model: Ranker,
    batch: RankerBatch,
    watched: dict[str, nn.Module],
    accs: dict[str, _Acc],
    fisher: FisherType,
    generator: torch.Generator | None,
    reduce: Reduce,
    dtype: torch.dtype,
) -> Tensor:
    """One forward and one backward; each module is reduced inside the
    backward as soon as all its calls have their output gradients, and its
    inputs are dropped then (``_hooks``: memory as in a plain backward)."""
    by_name: dict[str, list[Call]] = {}
    got: dict[str, dict[int, Tensor]] = {}
    ctx: dict = {}  # layouts, valid, the batch's x-side sums: set before the backward

    def flush(name: str) -> None:
        calls, mine = by_name.pop(name), got.pop(name, {})
        grads = [mine[c.index] if c.index in mine else _zeros(c) for c in calls]
        mine.clear()
        pos = module_positions(
            accs[name], calls, grads, ctx["layouts"], ctx["valid"], dtype, ctx["shared"]
        )
        del grads
        for c in calls:
            c.input = None  # autograd frees its own copy as the backward passes
        reduce(name, pos, int(ctx["valid"].shape[0]), ctx["cache"])

    def sink(call: Call, grad: Tensor) -> None:
        mine = got.setdefault(call.name, {})
        mine[call.index] = grad
        if len(mine) == len(by_name[call.name]):
            flush(call.name)

    with recording(watched, sink) as rec:
        scores = model(batch)
    layouts = model.token_layouts(batch)
    labels = _labels(scores.detach(), batch, fisher, generator)
    valid = (labels >= 0) & batch.candidate_mask.any(dim=1)
    if not rec.calls or not bool(valid.any()):
        return valid
    for call in rec.calls:
        by_name.setdefault(call.name, []).append(call)
    ctx.update(layouts=layouts, valid=valid, cache={}, shared=shared_inputs(rec.calls))
    # reduction="sum": per-example gradients unscaled (never a batch mean).
    loss = ranking_loss(scores, batch.candidate_mask, labels, reduction="sum")
    del scores
    torch.autograd.grad(loss, rec.anchor, allow_unused=True)
    for name in list(by_name):  # calls the loss does not depend on: zero gradients
        flush(name)
    return valid


def _zeros(call: Call) -> Tensor:
    shape, dtype, device = call.output_spec
    return torch.zeros(shape, dtype=dtype, device=device)


def _labels(
    scores: Tensor, batch: RankerBatch, fisher: FisherType, generator: torch.Generator | None
) -> Tensor:
    if fisher is FisherType.EMPIRICAL:
        return batch.labels
    # True Fisher: one label per query drawn from the model's masked softmax.
    real = batch.candidate_mask.any(dim=1)
    probs = masked_log_softmax(scores.float(), batch.candidate_mask).exp()
    probs = torch.where(real[:, None], probs, torch.ones_like(probs))
    where = generator.device if generator is not None else probs.device
    drawn = torch.multinomial(probs.to(where), 1, generator=generator).squeeze(1).to(scores.device)
    return torch.where(real, drawn, torch.full_like(drawn, -1))


# ---- accumulation ---------------------------------------------------------


def _first_pass(
    acc: _Acc,
    pos: Positions,
    n_queries: int,
    want_diag: bool,
    shared: dict | None = None,
    work: fx.Workspace | None = None,
) -> None:
    rule = acc.info.rule
    g, ex = pos.g, pos.example
    if rule is Rule.LAYERNORM:
        x = pos.x
        gw = fx.per_example_rows(g * x, ex, n_queries)
        _add(acc, "diag", gw.square().sum(0))
        if acc.info.bias:
            gb = fx.per_example_rows(g, ex, n_queries)
            _add(acc, "diag_bias", gb.square().sum(0))
        return
    acc.positions += int(g.shape[0])
    if rule is Rule.EMBEDDING:
        x = pos.x
        _add(acc, "g", g.T @ g)
        vocab = acc.info.weight_shape[0]
        _add(acc, "a", torch.bincount(x, minlength=vocab).to(g.dtype))
        if want_diag:
            token, rows = fx.embedding_pairs(x, g, ex, vocab)
            acc.diag.index_add_(0, token, rows.square())
        return
    x_sums = fx.conv1d_lag_sums(pos.conv, n_queries, work) if pos.conv is not None else None
    x = None if x_sums is not None else pos.x
    for key, value in fx.split_sums(x, g, ex, n_queries, shared, pos.key, x_sums).items():
        if isinstance(value, tuple):
            acc.means[key].add(*value)
        else:
            acc.sums[key].add_(value)
    if want_diag or acc.exact is not None:
        for chunk in fx.per_example_outer(g, pos.x, ex, n_queries):
            if want_diag:
                acc.diag.add_(chunk.square().sum(0))
            if acc.exact is not None:
                v = chunk.transpose(1, 2).reshape(chunk.shape[0], -1)  # column-stacking vec
                acc.exact.add_(v.T @ v)


def _second_pass(acc: _Acc, pos: Positions, n_queries: int) -> None:
    x, g, ex = pos.x, pos.g, pos.example
    if acc.info.rule is Rule.EMBEDDING:
        token, rows = fx.embedding_pairs(x, g, ex, acc.info.weight_shape[0])
        acc.s.index_add_(0, token, (rows @ acc.ug).square())
        return
    ua, ug = acc.ua, acc.ug
    fx.accumulate_squares(acc.s, fx.per_example_outer(g, x, ex, n_queries), lambda c: ug.T @ c @ ua)


def _add(acc: _Acc, attr: str, value: Tensor) -> None:
    getattr(acc, attr).add_(value)


def _split_diag(info: LayerInfo, acc: _Acc, n: int) -> dict[str, Tensor]:
    """``Σ_n (∇W̄_n)²`` -> ``F_jj`` per parameter, in each parameter's shape."""
    names = info.param_names
    if info.rule is Rule.LAYERNORM:
        out = {names[0]: (acc.diag / n).reshape(info.weight_shape).cpu()}
        if info.bias:
            out[names[1]] = (acc.diag_bias / n).reshape(info.weight_shape).cpu()
        return out
    if info.rule is Rule.EMBEDDING:
        return {names[0]: (acc.diag / n).cpu()}
    d = acc.diag / n
    out = {names[0]: d[:, : d.shape[1] - int(info.bias)].reshape(info.weight_shape).cpu()}
    if info.bias:
        out[names[1]] = d[:, -1].cpu()
    return out
