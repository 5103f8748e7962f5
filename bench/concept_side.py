"""Does a learnable concept side lift retrieval recall? (issue 12, item 2)

The query tower (kronlink/retrieval/tower.py) learns the mention side only;
its ontology index stays the shipped encoder's, and recall@10 stopped rising
near 0.78 on ICD-10-CM (results/retrieval/tower_icd_6ep.json). Here the
index's vectors are parameters too: every entry vector (a concept's name or
synonym, as the index holds them) starts at the shipped encoder's and is
trained with the tower, under the same full softmax over the ontology, with
its own learning rate. Scores stay cosines (the rows are normalised in the
forward pass), so the learned vectors are a drop-in DenseIndex for the
fused retriever. An ontology's vectors would belong to the version that
learned them, and learning another ontology never touches them.

    python bench/concept_side.py --task icd10cm --epochs 3 --json results/retrieval/concept_side_icd.json
    python bench/concept_side.py --table results/retrieval/concept_side_icd.json

Both arms (the query tower alone, and with the concept side) run in the same
process from the same seed: the whole train split, dev recall@10 (the first
--max-dev dev mentions) after each epoch picks the kept weights, then test
recall of dense alone and fused with BM25 (the served fusion settings).
A measurement only: the worker and the service do not use it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import loadavg, write_record

KS = (1, 10, 25, 100)


def _train(tower, bank0, task, a, learn_bank: bool) -> tuple[object, dict]:
    """Tune ``tower`` (and, with ``learn_bank``, the entry vectors) in place;
    returns the kept bank (unit rows) and the history."""
    import torch

    from kronlink.models.base import ranking_loss
    from kronlink.retrieval.tower import recall_at

    rng = random.Random(0)
    torch.manual_seed(0)
    bank = torch.nn.Parameter(bank0.clone(), requires_grad=learn_bank)
    usable = [q for q in task.split("train") if (q.gold or "") in tower._position]
    if a.max_train is not None and len(usable) > a.max_train:
        usable = rng.sample(usable, a.max_train)
    dev = task.split("dev")[: a.max_dev]
    data = tower.encode(usable)
    ids, mask, labels = data.features["input_ids"], data.features["attention_mask"], data.labels
    groups = [{"params": list(tower.encoder.parameters()), "lr": a.lr, "weight_decay": 0.01}]
    if learn_bank:
        groups.append({"params": [bank], "lr": a.bank_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    steps = math.ceil(len(usable) / a.batch_size)
    total = steps * a.epochs
    warm = max(1, int(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )

    def set_bank() -> None:
        with torch.no_grad():
            tower.bank = torch.nn.functional.normalize(bank.detach(), dim=-1).clone()

    def dev_recall() -> float:
        set_bank()
        return recall_at(tower, dev, (10,))["10"]

    best = dev_recall()
    history = [{"epoch": -1, "dev_recall10": best}]
    keep = ({k: v.clone() for k, v in tower.encoder.state_dict().items()}, bank.detach().clone())
    order = list(range(len(usable)))
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        rng.shuffle(order)
        tower.train()
        for b in range(steps):
            idx = order[b * a.batch_size : (b + 1) * a.batch_size]
            m = mask[idx]
            width = int(m.sum(1).max())
            q = tower.embed(ids[idx, :width], m[:, :width])
            # the index's rows as cosines: the forward pass normalises them
            tower.bank = torch.nn.functional.normalize(bank, dim=-1)
            scores = tower.scale * tower.concept_cosines(q)
            full = torch.ones_like(scores, dtype=torch.bool)
            loss = ranking_loss(scores, full, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower.encoder.parameters(), 1.0)
            opt.step()
            sched.step()
        tower.eval()
        r = dev_recall()
        history.append(
            {
                "epoch": epoch,
                "dev_recall10": r,
                "loss": float(loss.detach()),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(("concept side" if learn_bank else "query only"), history[-1], flush=True)
        if r > best:
            best = r
            keep = (
                {k: v.clone() for k, v in tower.encoder.state_dict().items()},
                bank.detach().clone(),
            )
    tower.encoder.load_state_dict(keep[0])
    kept = torch.nn.functional.normalize(keep[1], dim=-1)
    tower.bank = kept.clone()
    return kept, {"history": history, "best_dev_recall10": best}


def _test(tower, kept, dense0, task, bm25, settings: dict) -> dict:
    from retriever_tune import _fused_recall

    from kronlink.retrieval.dense import DenseIndex
    from kronlink.retrieval.tower import recall_at

    dense = DenseIndex(kept.numpy(), dense0.starts, dense0.ids, dense0.encoder)
    return {
        "dense": recall_at(tower, task.split("test"), KS),
        "fused": _fused_recall(task, dense, bm25, tower.query_encoder(), settings),
    }


def run(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from retriever_tune import _index

    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.retrieval import fusion_settings
    from kronlink.retrieval.tower import QueryTower
    from kronlink.settings import Settings

    settings = fusion_settings(Settings())
    task = build_task(a.task, seed=0, split_rule="mention", k=10)
    dense0 = _index(a.task, list(task.concepts), a.cache)
    bm25 = CandidateIndex(task.concepts)
    record: dict = {
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPUs, no GPU, torch threads {a.threads}",
        "settings": settings,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "split": "test, seed 0, by mention",
        "sizes": {sp: len(task.split(sp)) for sp in ("train", "dev", "test")},
        "entries": len(dense0.vectors),
        "loadavg_before": loadavg(),
        "arms": {},
    }
    bank0 = torch.from_numpy(dense0.vectors.copy())
    for arm, learn_bank in (("query only", False), ("concept side", True)):
        if a.arms and arm not in a.arms:
            continue
        tower = QueryTower.build().set_bank(dense0)
        kept, info = _train(tower, bank0, task, a, learn_bank)
        info["test"] = _test(tower, kept, dense0, task, bm25, settings)
        if learn_bank:
            moved = 1 - (kept * bank0).sum(1)  # 1 - cosine to the shipped vector
            info["entry_cosine_moved"] = {
                "mean": round(float(moved.mean()), 4),
                "max": round(float(moved.max()), 4),
                "entries_moved_over_0.01": int((moved > 0.01).sum()),
            }
        record["arms"][arm] = info
        record["loadavg_after"] = loadavg()
        write_record(a.json, record)
        print(arm, json.dumps(info["test"]), flush=True)
    return record


def table(record: dict) -> str:
    rows = [
        f"{record['args']['task']}, {record['args']['epochs']} epochs, query lr "
        f"{record['args']['lr']:g}, concept-side lr {record['args']['bank_lr']:g}:",
        "",
        "| arm | best dev r@10 | dense r@1 | dense r@10 | dense r@25 | fused r@1 | fused r@10 "
        "| fused r@25 | fused r@100 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, info in record["arms"].items():
        d, f = info["test"]["dense"], info["test"]["fused"]
        rows.append(
            f"| {arm} | {info['best_dev_recall10']:.3f} | {d['1']:.3f} | {d['10']:.3f} | "
            f"{d['25']:.3f} | {f['1']:.3f} | {f['10']:.3f} | {f['25']:.3f} | {f['100']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="icd10cm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bank-lr", type=float, default=1e-3)
    p.add_argument("--max-dev", type=int, default=1000)
    p.add_argument("--max-train", type=int, help="a seeded subset of train (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", nargs="*", help="'query only', 'concept side' (default both)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/kronlink-retrieval-cache"))
    p.add_argument("--json", type=Path, default=Path("results/retrieval/concept_side.json"))
    p.add_argument("--table", type=Path, help="print the markdown table of a record and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    run(a)
    print(table(json.loads(a.json.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
