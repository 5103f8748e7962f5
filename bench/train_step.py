"""Training throughput (queries/s) of both rankers: kronlink's ``train``
against a plain PyTorch loop over the same pre-tokenised tensors.

    .venv/bin/python bench/train_step.py [--candidates 25] [--batch-size 16]
        [--steps 4] [--repeats 3] [--models transformer,cnn] [--tables loop,raw]
        [--malloc default|keep] [--json results/bench/train_step_cpu.json]
    .venv/bin/python bench/train_step.py --from-json results/bench/train_step_cpu.json

Synthetic queries of realistic length (ICD-10-CM-like mentions and candidate
names). Table "loop" (issue 14): per ranker, one epoch of ``--steps`` batches,
timed as a whole, three ways, interleaved ``--repeats`` times so drift hits
all of them, median reported:

- ``plain loop``: a hand-written loop over batches collated before the clock
  starts (forward, ranking loss, backward, gradient clipping, AdamW with the
  same parameter groups, the same LR schedule): the hardware's speed for
  this recipe;
- ``kronlink train``: ``kronlink.training.train`` over the same queries, its
  tokenised-query cache already built (tokenising once is timed on its own);
- ``train, encode every step``: ``train`` with the cache turned off, as it
  ran before issue 14.

Table "raw": the older per-step table (encode + forward + backward + AdamW,
median step), with CUDA rows when a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kronlink import training
from kronlink.data.schema import Candidate, Query
from kronlink.models import build_ranker
from kronlink.models.base import ranking_loss
from kronlink.models.dataset import clear_cache, encoded_queries

WORDS = (
    "acute chronic type diabetes mellitus without complications fracture of left right femur "
    "unspecified hypertension asthma infection due to bacterial pneumonia renal failure "
    "with hyperglycemia neoplasm malignant benign lower upper limb injury initial encounter"
).split()


def synthetic_queries(n: int, c: int, seed: int = 0) -> list[Query]:
    rng = random.Random(seed)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        cands = tuple(Candidate(id=f"C{i}_{j}", name=phrase(3, 10)) for j in range(c))
        out.append(Query(mention=phrase(2, 6), gold=cands[0].id, candidates=cands, split="train"))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, device: torch.device, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_ranker(kind).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    queries = synthetic_queries(args.batch_size * (args.steps + args.warmup), args.candidates)
    use_amp = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(args.steps + args.warmup):
        chunk = queries[s * args.batch_size : (s + 1) * args.batch_size]
        sync(device)
        t0 = time.perf_counter()
        batch = model.encode(chunk).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            scores = model(batch)
        loss = ranking_loss(scores.float(), batch.candidate_mask, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {
        "model": kind,
        "device": str(device),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": median,
        "qps": args.batch_size / median,
        "peak_MiB": peak,
    }


PLAIN, OURS, BEFORE = "plain loop", "kronlink train", "train, encode every step"


def plain_epoch(model: torch.nn.Module, batches: list, cfg: training.TrainConfig) -> None:
    """The same recipe as ``train`` (parameter groups, AdamW, schedule,
    clipping), written as the shortest loop over ready tensors."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not n.startswith("head.")], "lr": cfg.lr},
        {"params": [p for n, p in named if n.startswith("head.")], "lr": cfg.head_lr},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, training._lr_lambda(total, int(cfg.warmup * total))
    )
    model.train()
    for b in batches:
        loss = ranking_loss(model(b), b.candidate_mask, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()


def compare(kind: str, args: argparse.Namespace) -> list[dict]:
    """Table "loop" rows for one ranker (CPU)."""
    n = args.batch_size * args.steps
    queries = synthetic_queries(n, args.candidates, seed=1)
    torch.manual_seed(0)
    model = build_ranker(kind)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = training.TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-4, device="cpu", seed=0)
    clear_cache()
    t0 = time.perf_counter()
    data = encoded_queries(model, queries)
    tokenise_s = time.perf_counter() - t0
    # the plain loop gets the same batches train draws (seed 0, no buckets)
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    batches = [data.batch(order[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    no_cache = training.encoded_queries

    def ours() -> None:
        training.train(model, queries, (), cfg)

    def before() -> None:
        training.encoded_queries = lambda m, q: None
        try:
            training.train(model, queries, (), cfg)
        finally:
            training.encoded_queries = no_cache

    runs = {PLAIN: lambda: plain_epoch(model, batches, cfg), OURS: ours}
    if not args.no_before:
        runs[BEFORE] = before
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats + 1):  # the first round warms up, untimed
        for name, run in runs.items():
            model.load_state_dict(init)
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            print(f"  {kind} / {name}: {dt:.2f}s", file=sys.stderr, flush=True)
    base = statistics.median(times[PLAIN])
    return [
        {
            "model": kind,
            "impl": name,
            "epoch_s": statistics.median(ts),
            "epoch_s_all": ts,
            "queries": n,
            "qps": n / statistics.median(ts),
            "x_plain_time": statistics.median(ts) / base,
            "tokenise_once_s": tokenise_s if name == OURS else None,
        }
        for name, ts in times.items()
    ]


def print_loop(rec: dict) -> None:
    a = rec["args"]
    print(
        f"\n{a['steps']} steps x {a['batch_size']} queries x {a['candidates']} candidates a run,"
        f" median of {a['repeats']} interleaved runs, torch {rec['torch']},"
        f" {rec['threads']} CPU threads, load average {rec['loadavg_start'][0]:.2f} at the"
        f" start, {rec['loadavg_end'][0]:.2f} at the end\n"
    )
    print("| model | loop | epoch (s) | queries/s | time x plain loop | tokenise once (s) |")
    print("|---|---|---|---|---|---|")
    for r in rec["rows"]:
        tok = "" if r["tokenise_once_s"] is None else f"{r['tokenise_once_s']:.2f}"
        print(
            f"| {r['model']} | {r['impl']} | {r['epoch_s']:.2f} | {r['qps']:.1f} "
            f"| {r['x_plain_time']:.3f} | {tok} |"
        )
    print()
    for r in rec["rows"]:
        if r["impl"] == OURS:
            ok = "met" if r["x_plain_time"] <= 1.15 else "NOT met"
            print(
                f"- {r['model']}: kronlink train within 15% of the plain loop: "
                f"{r['x_plain_time']:.3f}x the plain loop's time, {ok}."
            )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--candidates", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of table raw")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of table loop")
    p.add_argument("--models", default="transformer,cnn")
    p.add_argument("--tables", default="loop", help="loop, raw or both (comma separated)")
    p.add_argument("--no-before", action="store_true", help="table loop without the old path")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 on a "
        "shared CPU, where a busy core stalls torch's thread pool",
    )
    p.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: glibc keeps freed memory (kronlink/_malloc.py, what the worker and "
        "the training commands do); default: glibc as it comes",
    )
    p.add_argument("--json", type=Path, help="write table loop's record here")
    p.add_argument("--from-json", type=Path, help="print table loop from a record")
    args = p.parse_args()
    if args.from_json:
        print(f"From {args.from_json}:")
        print_loop(json.loads(args.from_json.read_text()))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False
    if args.malloc == "keep":
        from kronlink._malloc import keep_freed_memory

        kept = keep_freed_memory()
    tables = set(args.tables.split(","))
    if "loop" in tables:
        load = list(os.getloadavg())
        rows = [r for k in args.models.split(",") for r in compare(k, args)]
        rec = {
            "bench": "train_step",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "malloc_keep_freed": kept,
            "loadavg_start": load,
            "loadavg_end": list(os.getloadavg()),
            "peak_rss_mib": round(
                __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss
                / 1024
            ),
            "rows": rows,
        }
        print_loop(rec)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rec, indent=1) + "\n")
    if "raw" not in tables:
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [measure(k, d, args) for d in devices for k in args.models.split(",")]
    base = rows[0]["qps"]
    print(
        f"\ncandidates {args.candidates}, batch {args.batch_size} queries, median of {args.steps} steps,"
        f" torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print(
        "| model | device | params (M) | step (s) | queries/s | x CPU transformer | peak GPU MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['params_M']:.1f} | {r['step_s']:.3f} | {r['qps']:.1f} "
            f"| {r['qps'] / base:.2f} | {r['peak_MiB']:.0f} |"
        )


if __name__ == "__main__":
    main()
