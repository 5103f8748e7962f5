"""Does the retriever learn, and does it forget? (issue 12, item 2)

The query tower (kronlink/retrieval/tower.py: MiniLM on the mention side,
the ontology's index frozen) is tuned on ICD-10-CM (version 1), then on HPO
as an update, once per penalty; after each step the test recall of both
tasks is measured, dense alone and fused with BM25 (the served retriever).

    python bench/retriever_tune.py --json results/retrieval/tower.json
    python bench/retriever_tune.py --table results/retrieval/tower.json   # markdown

Tasks: `kronlink build-tasks` (seed 0, split by mention), the whole test
splits; training uses a seeded subset of each train split (--max-train) so
the run fits a CPU budget. Dense indexes are read from, or built into, the
same cache as bench/retrieval_table.py. The record is rewritten after every
step, so a run that is stopped keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import loadavg, write_record

KS = (1, 10, 25, 100)


def _index(name: str, concepts, cache: Path):
    """The same cache as bench/retrieval_table.py."""
    from retrieval_table import cached_index

    from kronlink.retrieval.dense import concepts_digest

    return cached_index(cache / f"{name}-{concepts_digest(concepts)[:16]}", concepts)[0]


def _fused_recall(task, dense, bm25, encoder, settings, split: str = "test") -> dict[str, float]:
    from kronlink.retrieval import Retriever

    test = task.split(split)
    mentions, golds = [q.mention for q in test], [q.gold for q in test]
    r = Retriever(task.concepts, mode="fused", dense=dense, encoder=encoder, bm25=bm25, **settings)
    hits = r.search(mentions, max(KS), query_vectors=encoder.encode(mentions))
    return {
        str(k): round(
            sum(g in [c for c, _ in h[:k]] for h, g in zip(hits, golds, strict=True)) / len(golds),
            4,
        )
        for k in KS
    }


def _measure(tower, world: dict, settings: dict) -> dict:
    """Test recall of every task, dense alone and fused, with the tower as it is."""
    from kronlink.retrieval.tower import recall_at

    out = {}
    for name, w in world.items():
        tower.set_bank(w["dense"])
        out[name] = {
            "dense": recall_at(tower, w["task"].split("test"), KS),
            "fused": _fused_recall(
                w["task"], w["dense"], w["bm25"], tower.query_encoder(), settings
            ),
        }
    return out


def _fusion_grid(tower, w: dict, settings: dict, weights: list[float]) -> list[dict]:
    """Fused recall on dev and test at each BM25 weight: a tuned tower may want
    less BM25 than the weights chosen for the zero-shot encoder."""
    encoder = tower.query_encoder()
    rows = []
    for wb in weights:
        s = {**settings, "w_bm25": wb}
        row = {"w_bm25": wb}
        for split in ("dev", "test"):
            row[split] = _fused_recall(w["task"], w["dense"], w["bm25"], encoder, s, split)
        rows.append(row)
        print("fusion", json.dumps(row), flush=True)
    return rows


def _curvature(tower, queries, n: int, batch: int, seed: int):
    import random

    import torch

    from kronlink.curvature import TaskState, estimate_curvature

    rng = random.Random(seed)
    picked = rng.sample(list(queries), min(n, len(queries)))
    batches = [tower.encode(picked[s : s + batch]) for s in range(0, len(picked), batch)]
    t0 = time.perf_counter()
    curv = estimate_curvature(
        tower,
        batches,
        kinds=("kfac", "diag"),
        fisher="true",
        generator=torch.Generator().manual_seed(seed),
    )
    return TaskState.from_model(tower, curv, {"queries": len(picked)}), time.perf_counter() - t0


def run(a: argparse.Namespace) -> dict:
    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.penalties import build_penalty
    from kronlink.retrieval import fusion_settings
    from kronlink.retrieval.tower import QueryTower, TuneConfig, tune
    from kronlink.settings import Settings

    settings = fusion_settings(Settings())
    record: dict = {
        "command": " ".join(sys.argv),
        "machine": f"{__import__('os').cpu_count()} CPUs, no GPU",
        "settings": settings,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "split": "test, seed 0, by mention",
        "loadavg_before": loadavg(),
        "steps": {},
    }
    world = {}
    for name in (a.first, a.second):
        task = build_task(name, seed=0, split_rule="mention", k=10)
        world[name] = {
            "task": task,
            "dense": _index(name, list(task.concepts), a.cache),
            "bm25": CandidateIndex(task.concepts),
        }
        record[f"{name}_sizes"] = {sp: len(task.split(sp)) for sp in ("train", "dev", "test")}

    def save() -> None:
        write_record(a.json, record)

    tower = QueryTower.build()
    record["steps"]["zero-shot"] = {"eval": _measure(tower, world, settings)}
    save()
    print("zero-shot", json.dumps(record["steps"]["zero-shot"]), flush=True)

    cfg = TuneConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        max_train=a.max_train,
        evals_per_epoch=a.evals,
    )
    first = world[a.first]
    tower.set_bank(first["dense"])
    dev1 = first["task"].split("dev")[: a.max_dev]
    res = tune(tower, first["task"].split("train"), dev1, cfg)
    record["steps"][f"v1: {a.first}"] = {
        "tune": res.as_dict(),
        "eval": _measure(tower, world, settings),
    }
    if a.fusion_grid:
        record["steps"][f"v1: {a.first}"]["fusion_grid"] = _fusion_grid(
            tower, first, settings, a.fusion_grid
        )
    save()
    if a.save_tower:
        import torch

        a.save_tower.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tower.encoder.state_dict(), a.save_tower)
    print("v1", json.dumps(record["steps"][f"v1: {a.first}"]["eval"]), flush=True)

    if not a.penalties:  # only the first task: how far tuning alone goes
        return record
    tower.set_bank(first["dense"])
    state, secs = _curvature(tower, first["task"].split("train"), a.curv_queries, 32, 0)
    record["curvature_s"] = round(secs, 1)
    save()
    v1 = copy.deepcopy(tower.encoder.state_dict())

    second = world[a.second]
    dev2 = second["task"].split("dev")[: a.max_dev]
    for spec in a.penalties:
        method, _, lam = spec.partition(":")
        tower.encoder.load_state_dict(v1)
        tower.set_bank(second["dense"])
        pen = None if method == "none" else build_penalty(method, [state], float(lam))
        res = tune(tower, second["task"].split("train"), dev2, cfg, penalty=pen)
        label = f"v2: {a.second}, {method}" + (f" λ={lam}" if lam else "")
        record["steps"][label] = {"tune": res.as_dict(), "eval": _measure(tower, world, settings)}
        save()
        print(label, json.dumps(record["steps"][label]["eval"]), flush=True)
    return record


def table(record: dict) -> str:
    tasks = [k.removesuffix("_sizes") for k in record if k.endswith("_sizes")]
    head = (
        "| after | "
        + " | ".join(f"{t} {kind} r@{k}" for t in tasks for kind in ("fused",) for k in (1, 10, 25))
        + " |"
    )
    rows = [head, "|---|" + "---|" * (3 * len(tasks))]
    for label, step in record["steps"].items():
        ev = step["eval"]
        rows.append(
            f"| {label} | "
            + " | ".join(f"{ev[t]['fused'][str(k)]:.3f}" for t in tasks for k in (1, 10, 25))
            + " |"
        )
    rows += ["", "Dense alone (the tower over the frozen index), recall@1/10/25/100:", ""]
    rows.append("| after | task | r@1 | r@10 | r@25 | r@100 |")
    rows.append("|---|---|---|---|---|---|")
    for label, step in record["steps"].items():
        for t in tasks:
            d = step["eval"][t]["dense"]
            rows.append(f"| {label} | {t} | " + " | ".join(f"{d[str(k)]:.3f}" for k in KS) + " |")
    for label, step in record["steps"].items():
        if not step.get("fusion_grid"):
            continue
        rows += [
            "",
            f"Fused at each BM25 weight ({label}; w_dense 1; the whole dev and test splits):",
            "",
        ]
        rows.append("| w_bm25 | dev r@1 | dev r@10 | dev r@25 | test r@1 | test r@10 | test r@25 |")
        rows.append("|---|---|---|---|---|---|---|")
        for g in step["fusion_grid"]:
            rows.append(
                f"| {g['w_bm25']:g} | "
                + " | ".join(f"{g[sp][str(k)]:.3f}" for sp in ("dev", "test") for k in (1, 10, 25))
                + " |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first", default="icd10cm")
    p.add_argument("--second", default="hpo")
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--max-dev", type=int, default=500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--evals", type=int, default=2, help="dev evaluations per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--curv-queries", type=int, default=1024)
    p.add_argument("--penalties", nargs="*", default=["none", "kfc-expand:10", "kfc-expand:100"])
    p.add_argument(
        "--fusion-grid",
        type=float,
        nargs="*",
        default=[],
        help="BM25 weights at which the first task's tuned tower is also measured, dev and test",
    )
    p.add_argument("--save-tower", type=Path, help="save the first task's tuned tower here")
    p.add_argument("--cache", type=Path, default=Path("/tmp/kronlink-retrieval-cache"))
    p.add_argument("--json", type=Path, default=Path("results/retrieval/tower.json"))
    p.add_argument("--table", type=Path, help="print the markdown table of a record and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    print(table(run(a)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
