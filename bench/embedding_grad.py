"""The embedding terms' sparse gradient against index_select's dense one, in
the CNN's training step (bench/curvature.py table 2's model, batch and prior).

    python bench/embedding_grad.py [--rounds 60] [--threads 1] [--json results/curvature/embedding_grad_cnn.json]

Each round runs one step with ``penalties._GatherRows`` (sparse rows) and one
with it replaced by ``index_select`` (a dense (V, d) gradient), in alternating
order, same model, penalty and batch; prints the median step of each and the
median of the rounds' paired differences. glibc keeps freed memory, as in
table 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from curvature import _keep_freed, make_batches, make_model

from kronlink import penalties
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.models.base import ranking_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="kfc")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kept = _keep_freed()
    args = argparse.Namespace(batches=4, batch_size=16, candidates=25)
    device = torch.device("cpu")
    model = make_model("cnn", device)
    batches = make_batches(model, args, device)
    prior = TaskState.from_model(
        model, estimate_curvature(model, batches, kinds=("kfac", "ekfac", "diag")), {}
    )
    model.train()
    pen = penalties.build_penalty(a.method, [prior], 1e3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sparse_apply = penalties._GatherRows.apply

    def dense_apply(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return w.index_select(0, rows)

    def step(gather, b) -> float:
        penalties._GatherRows.apply = gather
        t0 = time.perf_counter()
        loss = ranking_loss(model(b), b.candidate_mask, b.labels) + pen(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    try:
        for r in range(a.rounds + 2):
            b = batches[r % len(batches)]
            order = ("sparse", "dense") if r % 2 else ("dense", "sparse")
            got = {k: step(sparse_apply if k == "sparse" else dense_apply, b) for k in order}
            if r >= 2:  # warm-up
                for k, v in got.items():
                    times[k].append(v)
    finally:
        penalties._GatherRows.apply = sparse_apply
    diffs = [d - s for s, d in zip(times["sparse"], times["dense"], strict=True)]
    record = {
        "bench": "embedding_grad",
        "method": a.method,
        "threads": a.threads,
        "rounds": a.rounds,
        "malloc_keep_freed": kept,
        "loadavg": list(__import__("os").getloadavg()),
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "median_dense_minus_sparse_s": statistics.median(diffs),
        "times": times,
    }
    print("| gradient | median step (ms) |\n|---|---|")
    for k, v in record["median_step_s"].items():
        print(f"| {k} | {v * 1e3:.2f} |")
    print(
        f"median paired difference (dense - sparse): {record['median_dense_minus_sparse_s'] * 1e3:.2f} ms"
    )
    if a.json:
        a.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
