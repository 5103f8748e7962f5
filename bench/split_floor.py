"""The CNN's KFC penalty against the floor of its matrix products (issue 14,
item 3: one batched product per group of equal-shape layers).

    python bench/split_floor.py [--rounds 200] [--threads 1] [--json results/curvature/split_floor_cnn.json]
    python bench/split_floor.py --from-json results/curvature/split_floor_cnn.json

Setup as table 2 of bench/curvature.py: the CNN, 4 batches x 16 queries x 25
candidates, one prior task estimated with kfac+ekfac+diag on them, glibc
keeping freed memory, the model moved a little off the anchor. Each round
times plain training steps (forward, ranking loss, backward,
``clip_grad_norm_``, AdamW) and, for ``kfc`` (split rule) and ``kfc-expand``:

- ``penalty``: the whole penalty's forward and backward into zeroed gradients;
- ``conv group``: the one term of the four equal-shape 128 x 385 conv layers
  (``penalties._grouped_kfc``: a batched product over the stacked group, its
  operands stacked when the penalty is prepared), forward and backward;
- ``conv GEMMs``: the same matrix products as that term's forward and
  gradient (``_QuadraticForm``), on the same stacked Δ̄, with nothing else.

Each method's parts run right after a plain step (whose caches they find as
a training step's penalty would), the two methods' order alternating from
round to round; then a reference batched product (4, 128, 385) @ (4, 385,
385), the largest of them, for the core's rate. Reported: each part's median
(the plain step: over both of a round's), the conv GEMMs' FLOPs and rate,
and each part against the plain step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import loadavg, write_record
from curvature import LAMBDA, _keep_freed, make_batches, make_model

from kronlink import penalties
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.models import ranking_loss

METHODS = ("kfc", "kfc-expand")


def conv_group(pen: penalties.Penalty, model: torch.nn.Module) -> tuple[Any, ...]:
    """The term of the group of four conv layers, its parameter names,
    stacked anchor and plan."""
    for term in pen._prepared(model)[1][0]:
        cells = {type(c.cell_contents).__name__: c.cell_contents for c in term.__closure__ or ()}
        plan, anchor = cells.get("_GroupPlan"), cells.get("Tensor")
        if plan is not None and anchor.dim() == 3 and anchor.shape[0] == 4:
            return term, cells["list"], anchor, plan
    raise SystemExit("no group of four equal-shape layers in the penalty")


def gemms(d: torch.Tensor, plan: Any) -> float:
    """``_QuadraticForm``'s matrix products (forward and gradient) on ``d``;
    returns their FLOPs (2 per multiply-add)."""
    flops = 0.0

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonlocal flops
        out = a @ b
        flops += 2.0 * out.numel() * a.shape[-1]
        return out

    if plan.G is not None:
        mm(mm(plan.G, d.unsqueeze(1)), plan.A)
    for s in plan.low:
        E = d if s.g_lam is None else mm(s.G.mT, d)
        E = E if s.a_lam is None else mm(E, s.A)
        N = mm(s.G, E) if s.g_lam is None else E
        N = mm(N, s.A) if s.a_lam is None else N
        back = N if s.g_lam is None else mm(s.G, N)
        if s.a_lam is not None:
            mm(back, s.A.mT)
    return flops


def timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    kept = _keep_freed()
    load_before = loadavg()
    args = argparse.Namespace(batches=4, batch_size=16, candidates=25)
    dev = torch.device("cpu")
    model = make_model("cnn", dev)
    batches = make_batches(model, args, dev)
    state = estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag"))
    prior = TaskState.from_model(model, state, {"task": "bench"})
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    pens = {m: penalties.build_penalty(m, [prior], LAMBDA) for m in METHODS}
    groups = {m: conv_group(pens[m], model) for m in METHODS}
    params = dict(model.named_parameters())
    ds = {}
    for m, (_, names, anchor, _) in groups.items():
        assert all(n[0].startswith(("query_convs.", "name_convs.")) for n in names), names
        with torch.no_grad():
            ds[m] = torch.stack([penalties._bar(params, {}, n) for n in names]) - anchor
    flops = {m: gemms(ds[m], groups[m][3]) for m in METHODS}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ref_a, ref_b = torch.randn(4, 128, 385, generator=g), torch.randn(4, 385, 385, generator=g)

    def plain_step(b: Any) -> None:
        loss = ranking_loss(model(b), b.candidate_mask, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def backward_of(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            model.zero_grad(set_to_none=True)
            f().backward()

        return go

    parts: dict[str, dict[str, Callable[[], Any]]] = {}
    for m in METHODS:
        term = groups[m][0]
        parts[m] = {
            f"{m} penalty": backward_of(lambda m=m: pens[m](model)),
            f"{m} conv group": backward_of(lambda term=term: term(params)),
            f"{m} conv GEMMs": lambda m=m: gemms(ds[m], groups[m][3]),
        }
    times: dict[str, list[float]] = {"plain step": []}
    times.update({k: [] for ps in parts.values() for k in ps})
    times["reference GEMM"] = []
    step = 0
    for r in range(a.warmup + a.rounds):
        # each method's parts right after a plain step (caches as cold as in
        # a training step), the methods' order alternating from round to round
        order = METHODS if r % 2 == 0 else METHODS[::-1]
        row: dict[str, list[float]] = {k: [] for k in times}
        for m in order:
            row["plain step"].append(timed(lambda s=step: plain_step(batches[s % len(batches)])))
            step += 1
            for k, f in parts[m].items():
                row[k].append(timed(f))
        row["reference GEMM"].append(timed(lambda: ref_a @ ref_b))
        if r >= a.warmup:
            for k, v in row.items():
                times[k].extend(v)
    model.zero_grad(set_to_none=True)
    ref_flops = 2.0 * ref_a.shape[0] * ref_a.shape[1] * ref_a.shape[2] * ref_b.shape[2]
    return {
        "torch": torch.__version__,
        "threads": a.threads,
        "rounds": a.rounds,
        "malloc": "keep freed" if kept else "default",
        "order": "each method after a plain step, alternating",
        "loadavg_before": load_before,
        "conv_gemm_flops": flops,
        "reference_gemm_flops": ref_flops,
        "seconds": times,
    }


def show(rec: dict[str, Any], source: str | None = None) -> None:
    med = {k: statistics.median(v) for k, v in rec["seconds"].items()}
    plain = med["plain step"]
    where = f"From {source}: " if source else ""
    print(
        f"{where}CNN, {rec['threads']} thread(s), torch {rec['torch']}, {rec['rounds']} rounds, "
        f"malloc {rec['malloc']}, load average {rec['loadavg_before'][0]} at the start, "
        f"{rec.get('loadavg_after', ['?'])[0]} at the end\n"
    )
    print("| part | ms (median) | x plain step | GEMM GFLOP | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for k, v in med.items():
        fl = ""
        if k.endswith("conv GEMMs"):
            f = rec["conv_gemm_flops"][k.removesuffix(" conv GEMMs")]
            fl = f"{f / 1e9:.3f} | {f / v / 1e9:.0f}"
        elif k == "reference GEMM":
            f = rec["reference_gemm_flops"]
            fl = f"{f / 1e9:.3f} | {f / v / 1e9:.0f}"
        else:
            fl = " | "
        print(f"| {k} | {1e3 * v:.3f} | {v / plain:.3f} | {fl} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None)
    a = p.parse_args()
    if a.from_json is not None:
        show(json.loads(a.from_json.read_text()), str(a.from_json))
        return
    rec = run(a)
    if a.json is not None:
        write_record(a.json, rec)
    show(rec, str(a.json) if a.json else None)


if __name__ == "__main__":
    main()
