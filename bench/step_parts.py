"""Where a penalised training step's time goes: the step of bench/curvature.py
(table 2) cut into parts, per penalty, interleaved and paired.

    .venv/bin/python bench/step_parts.py [--model transformer] [--threads 1]
        [--methods none,kfc-expand,kfc] [--repeats 9] [--extra-opts 3]
        [--order permute|fixed] [--no-alone] [--malloc default|keep]
        [--prior /tmp/prior.safetensors] [--no-gc] [--json results/curvature/step_parts.json]

Setup as bench/curvature.py (``make_model``, ``make_batches``, one prior task
estimated with kfac+ekfac+diag on the same batches; ``--prior`` caches it, as
the estimate takes over a minute at one thread). Every method has its own
AdamW on the one model, as in table 2; ``--extra-opts N`` adds N more AdamW
states that step too (untimed), standing in for table 2's other penalties
(ewc, ekfac, the per-layer form), so the memory traffic matches table 2's.

Each round runs one step of every method, in an order that changes from
round to round (all permutations in turn), one batch a step as in table 2.
A step is timed in parts: forward + ranking loss, penalty forward, zero_grad
+ backward, ``clip_grad_norm_``, ``AdamW.step``; then, untimed in the step,
the penalty alone (penalty forward + its backward into zeroed gradients).
Reported: per method and part the median over rounds; per method the median
of each round's paired ratio (step / the ``none`` step of the same round),
which load that comes and goes cancels from, and the same per position in
the round's order, and each part's minor page faults (``ru_minflt``).

What it found (issue 14, docs/benchmarks.md "split rule"): with glibc's
malloc as it comes, a step faulted 80k to 190k pages back in that the step
before it had handed back to the kernel, and a step that followed a plain
step took up to 1 s more in its forward; with ``--malloc keep`` no step
faults a page and the KFC penalties cost what they cost alone.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from curvature import BEFORE, LAMBDA, UnfusedKFC, _keep_freed, make_batches, make_model

from kronlink.curvature import TaskState, estimate_curvature
from kronlink.models import ranking_loss
from kronlink.penalties import Penalty, build_penalty

PARTS = ("forward", "penalty", "backward", "clip", "adamw", "step")


def load_prior(model: torch.nn.Module, args: argparse.Namespace, batches: list) -> TaskState:
    if args.prior is not None and args.prior.exists():
        return TaskState.load(args.prior, model=model)
    state = estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag"))
    prior = TaskState.from_model(model, state, {"task": "bench"})
    if args.prior is not None:
        prior.save(args.prior)
        return TaskState.load(args.prior, model=model)  # the same prior, cached or not
    return prior


def timed_step(
    model: torch.nn.Module, batch: Any, pen: Penalty | None, opt: torch.optim.Optimizer
) -> dict[str, float]:
    """One step of table 2 (CPU: no autocast), each part's seconds."""
    t, f = [time.perf_counter()], [_faults()]

    def mark() -> None:
        t.append(time.perf_counter())
        f.append(_faults())

    loss = ranking_loss(model(batch).float(), batch.candidate_mask, batch.labels)
    mark()
    if pen is not None:
        loss = loss + pen(model)
    mark()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    mark()
    opt.step()
    mark()
    out = {p: b - a for p, a, b in zip(PARTS, t, t[1:], strict=False)}
    out["step"] = t[-1] - t[0]
    out.update({f"faults_{p}": b - a for p, a, b in zip(PARTS, f, f[1:], strict=False)})
    out["faults_step"] = f[-1] - f[0]
    return out


def _faults() -> int:
    """Minor page faults of this process so far (fresh pages from the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def penalty_alone(model: torch.nn.Module, pen: Penalty | None) -> float:
    if pen is None:
        return 0.0
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    pen(model).backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.malloc == "keep" and not _keep_freed():
        raise SystemExit("mallopt failed: not glibc?")
    dev = torch.device("cpu")
    model = make_model(args.model, dev)
    batches = make_batches(model, args, dev)
    prior = load_prior(model, args, batches)
    model.train()
    methods = args.methods.split(",")
    pens: dict[str, Penalty | None] = {
        m: None if m == "none" else build_penalty(m, [prior], LAMBDA)
        for m in methods
        if m != BEFORE
    }
    if BEFORE in methods:
        pens[BEFORE] = UnfusedKFC([prior], LAMBDA)
    opts = {m: torch.optim.AdamW(model.parameters(), lr=1e-5) for m in methods}
    extra = [torch.optim.AdamW(model.parameters(), lr=1e-5) for _ in range(args.extra_opts)]
    orders = list(itertools.permutations(methods)) if args.order == "permute" else [methods]
    rounds: list[dict[str, Any]] = []
    step_no = 0

    def extra_steps() -> None:  # table 2's other methods' AdamW states
        for o in extra:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            o.step()

    for r in range(args.warmup + args.repeats):
        order = orders[r % len(orders)]
        rec: dict[str, Any] = {"order": list(order), "parts": {}, "alone": {}}
        for m in order:
            b = batches[step_no % len(batches)]
            step_no += 1
            if args.no_gc:
                gc.disable()
            rec["parts"][m] = timed_step(model, b, pens[m], opts[m])
            if args.no_gc:
                gc.enable()
            rec["alone"][m] = penalty_alone(model, pens[m]) if args.alone else float("nan")
            if extra:
                extra_steps()
        if r >= args.warmup:
            rounds.append(rec)
            print(
                f"  round {len(rounds)}: "
                + ", ".join(
                    f"{m} {rec['parts'][m]['step']:.3f} (forward {rec['parts'][m]['forward']:.3f},"
                    f" {rec['parts'][m]['faults_forward']} faults)"
                    for m in order
                )
                + f"  load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
    return {"methods": methods, "rounds": rounds}


def summarise(res: dict) -> dict[str, Any]:
    methods, rounds = res["methods"], res["rounds"]
    med = statistics.median
    keys = [*PARTS, "faults_forward", "faults_step"]
    parts = {m: {p: med(r["parts"][m][p] for r in rounds) for p in keys} for m in methods}
    alone = {m: med(r["alone"][m] for r in rounds) for m in methods}
    ratio = {
        m: med(r["parts"][m]["step"] / r["parts"]["none"]["step"] for r in rounds) for m in methods
    }
    diff = {
        m: {p: med(r["parts"][m][p] - r["parts"]["none"][p] for r in rounds) for p in PARTS}
        for m in methods
    }
    pos: dict[str, dict[int, float]] = {}
    for m in methods:
        by: dict[int, list[float]] = {}
        for r in rounds:
            by.setdefault(r["order"].index(m), []).append(r["parts"][m]["step"])
        pos[m] = {i: med(v) for i, v in sorted(by.items())}
    return {"parts": parts, "alone": alone, "ratio": ratio, "diff": diff, "position": pos}


def show(s: dict[str, Any], methods: list[str]) -> None:
    fmt: Callable[[float], str] = lambda x: f"{x:.3f}"  # noqa: E731
    print(
        "\n| method | " + " | ".join(PARTS) + " | penalty alone (fwd+bwd) | paired x none"
        " | page faults: forward | step |"
    )
    print("|---|" + "---|" * (len(PARTS) + 4))
    for m in methods:
        row = " | ".join(fmt(s["parts"][m][p]) for p in PARTS)
        flt = f"{s['parts'][m]['faults_forward']:.0f} | {s['parts'][m]['faults_step']:.0f}"
        print(f"| {m} | {row} | {fmt(s['alone'][m])} | {s['ratio'][m]:.3f} | {flt} |")
    print("\nPaired difference to none, median over rounds (s):\n")
    print("| method | " + " | ".join(PARTS) + " |")
    print("|---|" + "---|" * len(PARTS))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{s['diff'][m][p]:+.3f}" for p in PARTS) + " |")
    print("\nStep median by position in the round's order (0 = first):\n")
    for m in methods:
        print(f"- {m}: " + ", ".join(f"{i}: {v:.3f}" for i, v in s["position"][m].items()))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="transformer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="none,kfc-expand,kfc")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--candidates", type=int, default=25)
    p.add_argument("--extra-opts", type=int, default=0, help="more AdamW states, stepped untimed")
    p.add_argument("--prior", type=Path, help="cache the prior task here (safetensors)")
    p.add_argument(
        "--order",
        choices=("permute", "fixed"),
        default="permute",
        help="permute: every order in turn; fixed: --methods' order every round (table 2's)",
    )
    p.add_argument(
        "--alone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the penalty alone after each step (frees the gradients before the next step)",
    )
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="default",
        help="keep: glibc keeps freed memory (bench/curvature.py's _keep_freed, its table 2 default)",
    )
    p.add_argument("--no-gc", action="store_true", help="Python's GC off during timed steps")
    p.add_argument("--json", type=Path, help="write the rounds and the summary here")
    args = p.parse_args()
    if "none" not in args.methods.split(","):
        p.error("--methods must include none (the paired baseline)")
    load = list(os.getloadavg())
    res = run(args)
    s = summarise(res)
    print(
        f"\n{args.model}, {args.threads} thread(s), {len(res['rounds'])} rounds after "
        f"{args.warmup} warm-up, torch {torch.__version__}, load {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end, MALLOC_ARENA_MAX="
        f"{os.environ.get('MALLOC_ARENA_MAX', '-')}, gc {'off' if args.no_gc else 'on'},"
        f" malloc {args.malloc}"
    )
    show(s, res["methods"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {
            "bench": "step_parts",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "loadavg_start": load,
            "loadavg_end": list(os.getloadavg()),
            "env": {
                k: os.environ.get(k)
                for k in (
                    "MALLOC_ARENA_MAX",
                    "MALLOC_TRIM_THRESHOLD_",
                    "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_MMAP_MAX_",
                )
            },
            **res,
            "summary": s,
        }
        args.json.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
