"""Hook plumbing: which modules to watch, and what they saw in one forward.

A forward hook records each call's input (detached). With a ``sink``, it
also passes the output through ``_Tap``, an identity whose backward hands
``∂(Σ_n ℓ_n)/∂output`` to the sink as soon as autograd has it and links the
output to one scalar ``anchor``. The estimator then asks autograd for the
anchor's gradient: that runs the backward pass through every tapped output
and computes no weight gradients the estimator would throw away. Each layer
is reduced to its sums inside the backward, so its input and output gradient
are freed there, as in a plain backward (asking ``torch.autograd.grad`` for
all outputs at once instead held every layer's input, output and gradient
for the whole batch: 3.4x a plain pass's memory on the transformer).
Without a sink, the recorder keeps the outputs for the caller to
differentiate (the batch-at-once reference that tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kronlink.curvature.state import LayerInfo, Rule
from kronlink.errors import UnsupportedModuleError


@dataclass
class Call:
    name: str
    module: nn.Module
    index: int  # 0 for the first call of this module in this forward, 1...
    input: Tensor | None  # dropped once the call's sums are taken
    output: Tensor | None  # kept only without a sink
    # The input's memory (pointer, shape, strides, dtype), taken while every
    # recorded input is alive: calls with equal keys read the same tensor.
    input_key: tuple = ()
    # (shape, dtype, device) of the output: a zero gradient for a call the
    # loss does not depend on.
    output_spec: tuple = ()


Sink = Callable[[Call, Tensor], None]


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    # The scalar every tapped output is linked to (``_Tap``); None without a sink.
    anchor: Tensor | None = None


class _Tap(torch.autograd.Function):
    """Identity on a module's output; its backward gives the gradient to the
    sink and passes it on unchanged. The anchor gets no gradient: it only
    makes autograd run this node when the anchor's gradient is asked for."""

    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor, call: Call, sink: Sink) -> Tensor:
        ctx.call, ctx.sink = call, sink
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        ctx.sink(ctx.call, grad)
        return grad, None, None, None


def rule_of(module: nn.Module) -> Rule | None:
    if isinstance(module, nn.Linear):
        return Rule.LINEAR
    if isinstance(module, nn.Conv1d):
        return Rule.CONV1D
    if isinstance(module, nn.Embedding):
        return Rule.EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return Rule.LAYERNORM
    return None


def plan(model: nn.Module) -> dict[str, tuple[nn.Module, LayerInfo]]:
    """The modules that own trainable parameters, each with its rule.

    Raises ``UnsupportedModuleError`` for a module type without a rule (its
    parameters would otherwise be left unprotected without anyone knowing),
    for unsupported options of a known type, and for parameters shared
    between modules (tied weights break the per-layer Kronecker structure).
    """
    out: dict[str, tuple[nn.Module, LayerInfo]] = {}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not any(p.requires_grad for _, p in own):
            continue
        for pname, p in own:
            full = f"{name}.{pname}" if name else pname
            if id(p) in owner:
                raise UnsupportedModuleError(
                    f"parameter {full!r} is shared with {owner[id(p)]!r} (tied weights); "
                    "kronlink's curvature rules need each parameter in one module"
                )
            owner[id(p)] = full
        rule = rule_of(module)
        label = f"{name or '<root>'} ({type(module).__name__})"
        if rule is None:
            raise UnsupportedModuleError(
                f"module {label} has parameters "
                f"{[n for n, _ in own]} but no curvature rule; supported: Linear, Conv1d, "
                "Embedding (Kronecker factors) and LayerNorm (diagonal)"
            )
        names = {n for n, _ in own}
        if not names <= {"weight", "bias"}:
            raise UnsupportedModuleError(f"module {label} has unexpected parameters {names}")
        if rule is Rule.CONV1D and (module.groups != 1 or module.padding_mode != "zeros"):
            raise UnsupportedModuleError(
                f"module {label}: only groups=1 and padding_mode='zeros' are supported, "
                f"got groups={module.groups}, padding_mode={module.padding_mode!r}"
            )
        if rule is Rule.EMBEDDING and module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"module {label}: scale_grad_by_freq=True rescales gradients per batch"
            )
        if rule is Rule.LAYERNORM and module.weight is None:
            raise UnsupportedModuleError(f"module {label}: a bias without a weight")
        info = LayerInfo(
            name=name,
            rule=rule,
            weight_shape=tuple(module.weight.shape),
            bias=getattr(module, "bias", None) is not None,
        )
        out[name] = (module, info)
    return out


@contextmanager
def recording(watched: dict[str, nn.Module], sink: Sink | None = None) -> Iterator[Recorder]:
    """Record the calls of ``watched`` modules during the forward(s) inside.

    With ``sink``, ``sink(call, grad)`` runs during the backward of every
    call that the loss depends on (see the module docstring)."""
    rec = Recorder()
    if sink is not None:
        rec.anchor = torch.zeros((), requires_grad=True)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None  # no gradient can reach this call (frozen inputs and weights)
            index = sum(1 for c in rec.calls if c.name == name)
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            spec = (output.shape, output.dtype, output.device)
            call = Call(name, module, index, x, output if sink is None else None, key, spec)
            rec.calls.append(call)
            if sink is None:
                return None
            return _Tap.apply(output, rec.anchor, call, sink)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in watched.items()]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
