"""The retrieval prior (kronlink/retrieval_prior.py) through the update job, on
a real task: dev and test top-1 of the retriever, the model alone and the
served score, per training setting.

    python bench/retrieval_prior.py [--out results/retrieval/retrieval_prior.json]
    python bench/retrieval_prior.py --table results/retrieval/retrieval_prior.json

ICD-10-CM's first 1,200 inclusion terms (``build_task(limit=1200)``: 956
train, 126 dev, 116 test queries, BM25 candidates, k = 10), the tiny character
CNN of the tests, ``run_update`` with the builders' own BM25 index as the
retriever. "ci" is the setting of
tests/test_retrieval_prior.py (300 train queries); "all-train" uses all 956.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import loadavg, write_record

SETTINGS = {"ci": 300, "all-train": None}  # train queries kept (None: all)
LIMIT, EPOCHS = 1200, 3


def run(out: Path) -> dict:
    import torch

    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.models import build_ranker
    from kronlink.training import TrainConfig
    from kronlink.update import UpdateRequest, run_update

    record: dict = {"loadavg_before": loadavg(), "task": "icd10cm", "limit": LIMIT, "rows": []}
    base = build_task("icd10cm", seed=0, k=10, limit=LIMIT)
    retriever = CandidateIndex(base.concepts)
    for name, n_train in SETTINGS.items():
        train = base.split("train")[:n_train]
        task = replace(base, queries=(*train, *base.split("dev"), *base.split("test")))
        torch.manual_seed(0)
        model = build_ranker(
            "cnn", tokenizer=None, embedding_dim=32, channels=32, hidden_size=32, dropout=0.0
        )
        cfg = TrainConfig(epochs=EPOCHS, batch_size=16, lr=1e-2, head_lr=None, seed=0)
        request = UpdateRequest(
            method="none",
            lambdas=0.0,
            kinds=("diag",),
            curvature_batch_size=64,
            train=cfg,
            exact_margin=5.0,
        )
        t0 = time.perf_counter()
        res = run_update(model, [], task, request, retriever=retriever)
        info = res.retrieval_prior["info"]
        alone = res.ablations["model_alone"]
        record["rows"].append(
            {
                "setting": name,
                "n_train": len(train),
                "n_dev": len(task.split("dev")),
                "n_test": len(task.split("test")),
                "epochs": EPOCHS,
                "beta": res.retrieval_prior["beta"],
                "best_beta": info["best_beta"],
                "sign_test": info["sign_test"],
                "retriever": [info["dev_top1_retriever"], info["test_top1_retriever"]],
                "model_alone": [alone["dev"]["accuracy"], alone["test"]["accuracy"]],
                "served": [res.dev.accuracy, res.test.accuracy],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(record["rows"][-1]), flush=True)
    write_record(out, record)
    return record


def table(record: dict) -> str:
    lines = [
        "| setting | train | beta | retriever dev / test | model alone dev / test "
        "| served dev / test |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        pair = " / ".join
        cells = [pair(f"{v:.3f}" for v in r[k]) for k in ("retriever", "model_alone", "served")]
        lines.append(
            f"| {r['setting']} | {r['n_train']} | {r['beta']:.3g} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/retrieval/retrieval_prior.json"))
    ap.add_argument("--table", type=Path, help="print the markdown table of a stored record")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    print(table(run(args.out)))


if __name__ == "__main__":
    main()
