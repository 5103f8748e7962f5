"""Numerical rank of the split rule's mean factors on the transformer ranker,
estimated from many queries (issue 14's scope question).

    .venv/bin/python bench/split_rank.py [--batches 32] [--batch-size 16] [--threads 1]
        [--json results/curvature/split_rank_transformer.json]

The mean factors ``A_mean = E_n[m mᵀ]``, ``G_mean = E_n[(Σ_t g)(Σ_t g)ᵀ]`` have
rank at most ``n_examples``, the bound ``KFCPenalty`` uses (``_low_rank``);
from more queries than a factor is wide the bound says nothing. Per factor
this prints its size, the bound, the eigenvalues' decay (float64
``eigvalsh``), how many lie above 1e-6 and 1e-7 of the largest, and the
smallest r whose dropped tail ``sqrt(Σ_{i>r} λ_i²)`` stays under
``_low_rank``'s check, ``64 · eps(float32) · ‖A‖_F``: the rank a
numerical-rank bound could use and still be exact to float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from curvature import make_batches, make_model

from kronlink.curvature import estimate_curvature


def spectrum(t: torch.Tensor, bound: int) -> dict:
    lam = torch.linalg.eigvalsh(t.to(torch.float64)).flip(0).clamp_min(0)
    top = float(lam[0])
    tail = lam.square().flip(0).cumsum(0).flip(0).sqrt()  # tail[r] = ‖λ_{r:}‖
    tol = 64 * torch.finfo(torch.float32).eps * float(lam.square().sum().sqrt())
    r_tol = int((tail > tol).sum())
    return {
        "size": t.shape[0],
        "rank_bound": bound,
        "above_1e-6": int((lam > 1e-6 * top).sum()),
        "above_1e-7": int((lam > 1e-7 * top).sum()),
        "rank_at_check": r_tol,
        "decay": {str(k): float(lam[k] / top) for k in (8, 32, 64, 128, 256) if k < len(lam)},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--candidates", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    model = make_model("transformer", dev)
    batches = make_batches(model, args, dev)
    t0 = time.perf_counter()
    state = estimate_curvature(model, batches, kinds=("kfac",))
    secs = time.perf_counter() - t0
    n = state.n_examples
    print(f"transformer, {n} queries, estimate {secs:.0f} s, load {os.getloadavg()[0]:.2f}")
    print("\n| layer | factor | size | bound | > 1e-6 max | > 1e-7 max | r at check | λ_64/λ_0 |")
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for name, sp in state.split.items():
        for fac in ("A_mean", "G_mean"):
            s = spectrum(getattr(sp, fac), n)
            out[f"{name}/{fac}"] = s
            d64 = s["decay"].get("64", float("nan"))
            print(
                f"| {name} | {fac} | {s['size']} | {n} | {s['above_1e-6']} | {s['above_1e-7']}"
                f" | {s['rank_at_check']} | {d64:.1e} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {
            "bench": "split_rank",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "n_examples": n,
            "estimate_seconds": secs,
            "loadavg_end": list(os.getloadavg()),
            "torch": torch.__version__,
            "factors": out,
        }
        args.json.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
