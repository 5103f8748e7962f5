"""Hook plumbing: which modules to watch, and what they saw in one forward.

A forward hook records each call's input (detached) and output. The
estimator then asks autograd for ``∂(Σ_n ℓ_n)/∂output`` of every recorded
output in one ``torch.autograd.grad`` call: that is the backward pass, and it
computes no weight gradients the estimator would throw away. (Tensor hooks on
the output, as curvlinops uses, would work too; asking for the outputs'
gradients directly keeps call order and grads together.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from kronlink.curvature.state import LayerInfo, Rule
from kronlink.errors import UnsupportedModuleError


@dataclass
class Call:
    name: str
    module: nn.Module
    index: int  # 0 for the first call of this module in this forward, 1...
    input: Tensor
    output: Tensor


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)

    def reset(self) -> None:
        self.calls = []


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
def recording(watched: dict[str, nn.Module]) -> Iterator[Recorder]:
    rec = Recorder()

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return  # no gradient can reach this call (frozen inputs and weights)
            index = sum(1 for c in rec.calls if c.name == name)
            rec.calls.append(Call(name, module, index, args[0].detach(), output))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in watched.items()]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
