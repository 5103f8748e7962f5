"""The CNN ranker's Embedding started at random or from the encoder's
word-piece embeddings (CNNRankerConfig.embedding_init), on the demo's tasks:
test and dev top-1 of the model alone (no exact-name prior), per seed. (A
task's stored candidates are shuffled, so BM25's own top-1 is not the first
candidate; bench/retrieval_prior.py measures it.)

    python bench/cnn_embedding_init.py results/clinical/cnn_embedding_init.json \\
        --task icd10cm=DEMO/tasks/icd10cm --task hpo=DEMO/tasks/hpo --seeds 0 1

Training is the demo's (lr 1e-3, ``--epochs``, 2 by default); each run builds
a fresh ranker. Not a timing: no lock needed.

    python bench/cnn_embedding_init.py --table results/clinical/demo_cnn/*.json

re-prints the mean dev and test top-1 over the seeds, per record (epochs),
task and start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _record import loadavg, write_record

from kronlink.data.io import load_task
from kronlink.evaluation import evaluate
from kronlink.models.cnn import CNNRanker, CNNRankerConfig
from kronlink.training import TrainConfig, train


def _pair(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def table(paths: list[Path]) -> str:
    lines = [
        "| epochs | task | start | seeds | dev top-1 (mean) | test top-1 (mean) | load (1 min) |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for path in paths:
        rec = json.loads(path.read_text())
        load = f"{rec['loadavg_before'][0]}-{rec['loadavg_after'][0]}"
        for task in dict.fromkeys(r["task"] for r in rec["runs"]):
            for init in ("random", "encoder"):
                rs = [r for r in rec["runs"] if r["task"] == task and r["init"] == init]
                dev = sum(r["dev"] for r in rs) / len(rs)
                test = sum(r["test"] for r in rs) / len(rs)
                seeds = ",".join(str(r["seed"]) for r in rs)
                lines.append(
                    f"| {rec['epochs']} | {task} | {init} | {seeds} | {dev:.3f} | {test:.3f} | {load} |"
                )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--task", action="append", type=_pair)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--table", type=Path, nargs="+", help="re-print these records and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if args.out is None or not args.task:
        p.error("give the record to write and at least one --task NAME=PATH (or --table)")
    record: dict = {"loadavg_before": loadavg(), "epochs": args.epochs, "runs": []}
    for name, path in args.task:
        task = load_task(path)
        for seed in args.seeds:
            for init in ("random", "encoder"):
                torch.manual_seed(seed)
                model = CNNRanker.build(CNNRankerConfig(embedding_init=init))
                cfg = TrainConfig(epochs=args.epochs, lr=1e-3, seed=seed)
                t0 = time.perf_counter()
                train(model, task.split("train"), task.split("dev"), cfg)
                row = {
                    "task": name,
                    "seed": seed,
                    "init": init,
                    "train_s": round(time.perf_counter() - t0, 1),
                    **{
                        s: round(evaluate(model, task.split(s)).accuracy, 4)
                        for s in ("dev", "test")
                    },
                }
                record["runs"].append(row)
                print(json.dumps(row), flush=True)
    record["loadavg_after"] = loadavg()
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
