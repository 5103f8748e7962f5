"""``kronlink experiment CONFIG``: run the paper's protocol from a TOML file
(docs/experiments.md). Finished runs are stored by the hash of their spec and
never run again, so the command resumes where it stopped; ``--max-minutes``
keeps one invocation inside a time budget (a device command's 10 minutes)."""

from __future__ import annotations

import argparse
import json
import sys
import time

# Spelled out here so that `kronlink --help` imports no torch; run() checks
# them against kronlink.experiments.config.TIERS.
_TIER_NAMES = ("tier1", "combined", "tier2", "tier3", "early", "figure2")


def run(args: argparse.Namespace) -> int:
    from kronlink.cli._common import keep_freed_memory_if_set
    from kronlink.experiments import load_config, run_experiment
    from kronlink.experiments.config import TIERS

    keep_freed_memory_if_set()

    cfg = load_config(args.config)
    tiers = [t.strip() for t in args.only.split(",")] if args.only else None
    known = (*TIERS, "figure2")
    unknown = [t for t in tiers or () if t not in known]
    if unknown:
        print(f"--only: unknown tier(s) {unknown}; known: {list(known)}", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else cfg.workers
    if workers < 1 or (args.threads is not None and args.threads < 1):
        print(
            f"--workers/--threads: expected integers >= 1, got {workers}/{args.threads}",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None and workers == 1:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def on_event(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {message}", file=sys.stderr, flush=True)

    res = run_experiment(
        cfg,
        tiers=tiers,
        rankers=[r.strip() for r in args.rankers.split(",")] if args.rankers else None,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        on_event=on_event,
        workers=workers,
        threads=args.threads,
    )
    summary = {
        "config": str(args.config),
        "results": str(cfg.results_dir),
        "ran": res.ran,
        "reused": res.reused,
        "complete": res.complete,
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    # 3: stopped by the time budget; run the same command again to go on.
    return 0 if res.complete else 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "experiment",
        help="run the paper's experiments from a TOML config (resumable)",
        description="Run tiers 1-3, the early comparison and Figure 2 as a config defines; "
        "stored runs are reused. Exit code 3: stopped by --max-minutes, run again to go on.",
    )
    e.add_argument("config", help="TOML file, e.g. experiments/cpu_small.toml")
    e.add_argument(
        "--only",
        default=None,
        help=f"comma-separated tiers to run now, of {', '.join(_TIER_NAMES)} "
        "(default: all the config names)",
    )
    e.add_argument("--rankers", default=None, help="comma-separated ranker names (default: all)")
    e.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    e.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new run after this many minutes (exit code 3 if stopped)",
    )
    e.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes running independent runs side by side, on one GPU or split over "
        "the CPU cores (default: the config's workers, else 1)",
    )
    e.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: with --workers N > 1, the cores split "
        "between them; with one, torch's own)",
    )
    e.set_defaults(func=run)
