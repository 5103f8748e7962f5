"""``kronlink fisher``: estimate and save a task's curvature and anchor weights."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kronlink.cli._common import load_split, progress_bar


def run(args: argparse.Namespace) -> int:
    import torch

    from kronlink.curvature import TaskState, estimate_curvature
    from kronlink.models import load_ranker
    from kronlink.training import pick_device

    task, queries = load_split(args.task, args.split, args.limit, args.seed)
    device = pick_device(args.device)
    model = load_ranker(args.model).to(device)
    batches = [
        model.encode(queries[i : i + args.batch_size])
        for i in range(0, len(queries), args.batch_size)
    ]
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    passes = 2 if "ekfac" in kinds else 1
    bar = progress_bar(len(batches) * passes, f"fisher {task.name}", "batch")

    def progress(done: int, total: int | None) -> None:
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    curvature = estimate_curvature(
        model,
        batches,
        kinds=kinds,
        fisher=args.fisher,
        include_other=not args.drop_other,
        progress=progress,
        device=device,
    )
    bar.close()
    state = TaskState.from_model(
        model,
        curvature,
        {
            "task": task.name,
            "model": str(args.model),
            "split": args.split,
            "n_examples": curvature.n_examples,
            "train_size": len(task.split("train")),
        },
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state.save(out, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "out": str(out),
                "task": task.name,
                "n_examples": curvature.n_examples,
                "kinds": list(kinds),
                "fisher": str(args.fisher),
                "bytes": out.stat().st_size,
                "parameter_bytes": 4 * n_params,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fisher",
        help="estimate and save a task's curvature and anchor weights",
        description="One pass over a task split: KFAC, EKFAC and diagonal Fisher "
        "of every layer, saved with the model's weights as the anchor.",
    )
    f.add_argument("--model", required=True, help="saved model folder (the anchor)")
    f.add_argument("--task", required=True, help="task folder")
    f.add_argument("--out", required=True, help="state file to write (.safetensors)")
    f.add_argument(
        "--split",
        choices=["train", "dev", "test"],
        default="train",
        help="split to estimate on (default: %(default)s)",
    )
    f.add_argument(
        "--kinds",
        default="kfac,ekfac,diag",
        help="curvature kinds, comma-separated (default: %(default)s)",
    )
    f.add_argument(
        "--fisher",
        choices=["empirical", "true"],
        default="empirical",
        help="gold labels (empirical) or labels sampled from the model (default: %(default)s)",
    )
    f.add_argument(
        "--drop-other",
        action="store_true",
        help="no diagonal Fisher for layers without a Kronecker rule (LayerNorm), as the paper",
    )
    f.add_argument("--bf16", action="store_true", help="store factors in bf16 (half the bytes)")
    f.add_argument(
        "--limit", type=int, default=None, help="use a seeded subset of this many queries"
    )
    f.add_argument(
        "--batch-size", type=int, default=16, help="queries per batch (default: %(default)s)"
    )
    f.add_argument("--seed", type=int, default=0, help="subset seed (default: %(default)s)")
    f.add_argument("--device", default=None, help="device (default: CUDA if available)")
    f.set_defaults(func=run)
