"""Training throughput (queries/s) of both rankers, on CPU and, where present, CUDA.

    .venv/bin/python bench/train_step.py [--candidates 25] [--batch-size 16] [--steps 5]

Synthetic queries of realistic length (ICD-10-CM-like mentions and candidate
names); one step = encode + forward + backward + AdamW update. The first
steps warm up and are not timed. Prints a markdown table; the ratio column is
each row's throughput over the CPU transformer row measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kronlink.data.schema import Candidate, Query
from kronlink.models import build_ranker
from kronlink.models.base import ranking_loss

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


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--candidates", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="transformer,cnn")
    args = p.parse_args()
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
