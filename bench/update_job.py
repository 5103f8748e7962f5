"""Wall time of one update job by phase, and the bytes stored per task.

    .venv/bin/python bench/update_job.py [--model cnn|transformer] [--limit 2500]
        [--k 10] [--epochs 2] [--method kfc] [--lambda 10|auto] [--grid paper|half|N,N]
        [--threads N] [--device cpu]

Setup (not timed): ICD-10-CM is the prior task (a ranker trained on it, its
curvature estimated and saved as a state file), HPO the new one, saved as a
staged task folder. The timed job is what the worker will run minus the
database: load the staged task, the model and the prior state; ``run_update``
(validate, select_lambda with "auto", train, curvature, evaluate); save the
new model and state. Prints a markdown table (phase, seconds, share of the
job's wall time), the share outside train + select_lambda + curvature (the
issue's target: under 10% on a realistic task size), and the new state's file
size against the model's parameter bytes (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kronlink.cli.update import parse_grid, parse_lambdas
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.builders import build_task
from kronlink.data.io import load_task, save_task
from kronlink.models import build_ranker, load_ranker
from kronlink.training import TrainConfig, seed_everything, train
from kronlink.update import UpdateRequest, run_update

WORK_PHASES = ("train", "select_lambda", "curvature")


def setup(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path, TrainConfig]:
    """The prior model and state (ICD-10-CM) and the staged new task (HPO)."""
    t0 = time.perf_counter()
    old = build_task("icd10cm", seed=0, k=args.k, limit=args.limit)
    new = build_task("hpo", seed=0, k=args.k, limit=args.limit)
    staged = save_task(new, root / "staged" / "hpo")
    seed_everything(0)
    kw = {"dropout": 0.0} if args.model == "cnn" else {"num_layers": 3}
    model = build_ranker(args.model, **kw)
    lr = 1e-3 if args.model == "cnn" else 1e-4
    cfg = TrainConfig(epochs=args.epochs, batch_size=16, lr=lr, device=args.device, seed=0)
    train(model, old.split("train"), old.split("dev"), cfg)
    qs = old.split("train")
    batches = [model.encode(qs[i : i + 16]) for i in range(0, len(qs), 16)]
    curv = estimate_curvature(model, batches, kinds=("kfac", "diag"))
    prior = TaskState.from_model(model, curv, {"task": old.name, "train_size": len(qs)})
    prior_path = root / "icd10cm.safetensors"
    prior.save(prior_path)
    model_dir = root / "v1"
    model.to("cpu").save(model_dir)
    sizes = {s: len(new.split(s)) for s in ("train", "dev", "test")}
    print(f"setup {time.perf_counter() - t0:.1f} s; new task hpo {sizes}")
    return model_dir, prior_path, staged, cfg


def job(args, model_dir: Path, prior_path: Path, staged: Path, cfg: TrainConfig, root: Path):
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    task = load_task(staged)
    model = load_ranker(model_dir)
    priors = [TaskState.load(prior_path, model=model)]
    timings["load"] = time.perf_counter() - t0
    request = UpdateRequest(
        method=args.method, lambdas=parse_lambdas(args.lam), train=cfg, **parse_grid(args.grid)
    )
    result = run_update(model, priors, task, request)
    timings.update({k: v for k, v in result.timings.items() if k != "total"})
    t1 = time.perf_counter()
    model.to("cpu").save(root / "v2")
    state_path = root / "hpo.safetensors"
    assert result.new_state is not None
    result.new_state.save(state_path, dtype=request.state_torch_dtype)
    timings["save"] = time.perf_counter() - t1
    return result, timings, state_path, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["cnn", "transformer"], default="cnn")
    p.add_argument("--limit", type=int, default=2500, help="mentions per task before splitting")
    p.add_argument("--k", type=int, default=10, help="candidates per query")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--method", default="kfc")
    p.add_argument("--lambda", dest="lam", default="10")
    p.add_argument("--grid", default="paper")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, prior_path, staged, cfg = setup(args, root)
        result, timings, state_path, model = job(args, model_dir, prior_path, staged, cfg, root)
        wall = sum(timings.values())
        print(
            f"\n{args.model}, method {args.method}, λ {args.lam} -> {result.lambdas}, "
            f"{args.epochs} epoch(s), test accuracy {result.test.accuracy:.4f}, "
            f"predicted forgetting {[round(v, 4) for v in result.predicted_forgetting]}\n"
        )
        print("| phase | seconds | share of wall time |")
        print("|---|---|---|")
        for phase, sec in timings.items():
            print(f"| {phase} | {sec:.3f} | {sec / wall:.1%} |")
        print(f"| **job** | {wall:.3f} | 100% |")
        outside = wall - sum(timings.get(k, 0.0) for k in WORK_PHASES)
        print(f"\nshare outside {' + '.join(WORK_PHASES)}: {outside / wall:.1%} (target < 10%)")
        n_params = sum(p.numel() for p in model.parameters())
        state_bytes = state_path.stat().st_size
        print(
            f"new task state: {state_bytes:,} bytes ({', '.join(result.new_state.curvature.kinds)}"
            f" + anchor); parameters fp32: {4 * n_params:,} bytes; "
            f"ratio {state_bytes / (4 * n_params):.2f}x"
        )
        if result.selection:
            print(json.dumps([r.as_dict() for r in result.selection], indent=1))


if __name__ == "__main__":
    main()
