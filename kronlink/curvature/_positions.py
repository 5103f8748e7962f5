"""Positions of one module call: which rows and positions are real, which
query each belongs to, and the (input, output-gradient) pairs there. The
calls of a module that ran several times in one forward are pooled."""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterator
from typing import Any

import torch
from torch import Tensor

from kronlink.curvature import factors as fx
from kronlink.curvature._hooks import Call
from kronlink.curvature.state import LayerInfo, Rule
from kronlink.errors import ConfigError
from kronlink.models.base import TokenLayout


class Positions:
    """``x`` (P, p̄) inputs (augmented), token ids (P,) or x̂ (P, D); ``g``
    (P, q); ``example`` (P,); equal ``key``s: equal x (``module_positions``).
    A Conv1d's ``x`` (its patches) is formed only when read: the split
    rule's sums take ``conv`` instead (``fx.conv1d_lag_sums``), and on the
    CNN gathering the patches cost as much as the convolution itself."""

    def __init__(
        self,
        x: Tensor | Callable[[], Tensor],
        g: Tensor,
        example: Tensor,
        key: Hashable | None = None,
        conv: fx.ConvInput | None = None,
    ) -> None:
        self._x = x
        self.g, self.example, self.key, self.conv = g, example, key, conv

    @property
    def x(self) -> Tensor:
        if callable(self._x):
            self._x = self._x()
        return self._x


def _layout(call: Call, layouts: dict, n_rows: int, n_queries: int, positions_per_row: int):
    entry = layouts.get(call.name)
    if isinstance(entry, TokenLayout):
        if call.index > 0:
            raise ConfigError(
                f"module {call.name!r} ran {call.index + 1} times in one forward; token_layouts "
                "must give a list with one TokenLayout per call, in call order"
            )
        return entry
    if isinstance(entry, list | tuple):
        if call.index >= len(entry):
            raise ConfigError(
                f"module {call.name!r} ran more often than its {len(entry)} token layouts"
            )
        return entry[call.index]
    if entry is None and n_rows == n_queries and positions_per_row == 1:
        # One row per query, one position per row: nothing to mask.
        return None
    raise ConfigError(
        f"token_layouts gives no layout for module {call.name!r}, whose input has "
        f"{n_rows} rows x {positions_per_row} positions for {n_queries} queries"
    )


def positions(
    info: LayerInfo, call: Call, grad: Tensor, layouts: dict, valid: Tensor, dtype: torch.dtype
) -> Positions:
    rule, module = info.rule, call.module
    x = call.input
    if rule is Rule.LINEAR:
        n = x.shape[0] if x.dim() > 1 else 1
        xs = x.reshape(n, -1, x.shape[-1]).to(dtype)
        gs = grad.reshape(n, -1, grad.shape[-1]).to(dtype)
    elif rule is Rule.CONV1D:
        if x.dim() != 3:
            raise ConfigError(f"Conv1d {call.name!r}: expected a batched (N, C, T) input")
        x = x.to(dtype)
        xs = None  # the patches, formed by ``selected`` only if asked for (a padded copy)
        gs = grad.to(dtype).transpose(1, 2)
        n = x.shape[0]
    elif rule is Rule.EMBEDDING:
        n = x.shape[0] if x.dim() > 0 else 1
        xs = x.reshape(n, -1)
        gs = grad.reshape(n, xs.shape[1], -1).to(dtype)
    else:  # LayerNorm
        d = len(module.normalized_shape)
        n = x.shape[0] if x.dim() > d else 1
        xhat = fx.layer_norm_hat(module, x.to(dtype))
        xs = xhat.reshape(n, -1, xhat.shape[-1])
        gs = grad.to(dtype).reshape(n, xs.shape[1], -1)
    positions, device = gs.shape[1], gs.device
    lay = _layout(call, layouts, n, valid.shape[0], positions)
    if lay is None:
        mask = torch.ones(n, positions, dtype=torch.bool, device=device)
        example = torch.arange(n, device=device)
    else:
        mask, example = lay.mask.to(device), lay.example.to(device)
        if mask.numel() != n * positions or example.shape != (n,):
            raise ConfigError(
                f"token layout of {call.name!r}: mask {tuple(mask.shape)} / example "
                f"{tuple(example.shape)} do not fit an input of {n} rows x {positions} positions"
            )
        mask = mask.reshape(n, positions).bool()
        if example.numel() and (int(example.min()) < 0 or int(example.max()) >= valid.shape[0]):
            raise ConfigError(f"token layout of {call.name!r}: example index out of range")
    # Positions of skipped examples (no label) count nowhere, like padding.
    keep = mask & valid[example][:, None]
    if rule is Rule.EMBEDDING and module.padding_idx is not None:
        # PyTorch gives the padding row no gradient: such positions are padding.
        keep = keep & (xs != module.padding_idx)
    ex = example[:, None].expand(n, positions)[keep]
    bias = rule in (Rule.LINEAR, Rule.CONV1D) and module.bias is not None

    def selected() -> Tensor:
        sel = (xs if xs is not None else fx.conv1d_patches(module, x))[keep]
        if sel.dim() > 2:  # conv1d_patches' (N, T_out, C_in, k) view
            sel = sel.reshape(sel.shape[0], -1)
        # the bias column after the selection: padding is never copied
        return fx.augment(sel) if bias else sel

    if rule is Rule.CONV1D and fx.ConvInput.supports(module):
        conv = fx.ConvInput(module, x, keep, example)
        return Positions(x=selected, g=gs[keep], example=ex, conv=conv)
    return Positions(x=selected(), g=gs[keep], example=ex)


def module_positions(
    acc: Any,
    calls: list[Call],
    grads: list[Tensor],
    layouts: dict,
    valid: Tensor,
    dtype: torch.dtype,
    shared: Collection[tuple],
) -> Positions:
    """One ``Positions`` for all calls of one module in this forward, pooled
    (a shared encoder), so that per-query gradients, means and exact blocks
    sum over all of its calls. A Linear called once on an input in
    ``shared`` (``shared_inputs``) gets a ``key`` that names its selected
    input: modules fed the same tensor with the same layout (a transformer's
    query, key and value) share the x-side sums (``split_sums``'s
    ``cache``); the others get none, so the cache holds nothing they alone
    would use."""
    parts = []
    for call, grad in zip(calls, grads, strict=True):
        acc.calls += 1
        parts.append(positions(acc.info, call, grad, layouts, valid, dtype))
    if len(parts) > 1:
        return Positions(
            x=torch.cat([p.x for p in parts]),
            g=torch.cat([p.g for p in parts]),
            example=torch.cat([p.example for p in parts]),
        )
    pos = parts[0]
    if acc.info.rule is Rule.LINEAR and calls[0].input_key in shared:
        lay = layouts.get(calls[0].name)
        pos.key = (
            calls[0].input_key,
            acc.info.bias,
            id(lay.mask) if isinstance(lay, TokenLayout) else None,
            id(lay.example) if isinstance(lay, TokenLayout) else None,
        )
    return pos


def shared_inputs(calls: list[Call]) -> set[tuple]:
    """Input keys that more than one call read."""
    seen: set[tuple] = set()
    out: set[tuple] = set()
    for c in calls:
        (out if c.input_key in seen else seen).add(c.input_key)
    return out


def grouped(
    accs: dict,
    calls: list[Call],
    grads: list[Tensor],
    layouts: dict,
    valid: Tensor,
    dtype: torch.dtype,
) -> Iterator[tuple[str, Positions]]:
    """``module_positions`` of every module, from a whole batch's calls and
    output gradients at once (the reference the estimator's in-backward
    reduction is tested against)."""
    shared = shared_inputs(calls)
    by_name: dict[str, tuple[list[Call], list[Tensor]]] = {}
    for call, grad in zip(calls, grads, strict=True):
        cs, gs = by_name.setdefault(call.name, ([], []))
        cs.append(call)
        gs.append(grad)
    for name, (cs, gs) in by_name.items():
        yield name, module_positions(accs[name], cs, gs, layouts, valid, dtype, shared)
