"""The fused retriever's recall@1/10/25/100 over a grid of fusion settings
(BM25's weight, the reciprocal-rank constant), on the dev and test splits of
`kronlink build-tasks` (seed 0, by mention), with the shipped encoder
(zero-shot), beside BM25 and dense alone.

    python bench/fusion_grid.py --json results/retrieval/fusion_grid.json
    python bench/fusion_grid.py --table results/retrieval/fusion_grid.json [--points 0.25,10]

Settings are chosen on dev and read on test, one setting for all tasks (they
are service-wide): the rule (``choose``) keeps the settings whose dev recall
at k = 1, 10 and 25 is at least the better of BM25 and dense alone at that k
on every task, and of those takes the best mean dev recall@10 (then @25, then
@1). Dense vectors are cached as in bench/retrieval_table.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import loadavg, write_record
from retrieval_table import KS, _recall, cached_index

GUARDED = ("1", "10", "25")


class _Memo:
    """Delegates to ``inner``, memoising ``method`` by its arguments' identity:
    every grid point re-reads the same BM25 lists and cosines. The memo keeps
    the arguments alive, so an id is never reused by another array."""

    def __init__(self, inner: object, method: str) -> None:
        self._inner, self._method, self._memo = inner, method, {}

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def memoised(*args):
            key = tuple(
                id(a) if isinstance(a, np.ndarray) else tuple(a) if isinstance(a, list) else a
                for a in args
            )
            if key not in self._memo:
                self._memo[key] = (args, attr(*args))
            return self._memo[key][1]

        return memoised


def measure(name: str, cache: Path, grid: list[tuple[float, float]], depth: int) -> dict:
    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.retrieval import Retriever, shared_encoder
    from kronlink.retrieval.dense import concepts_digest

    task = build_task(name, seed=0, split_rule="mention", k=10)
    concepts = list(task.concepts)
    encoder = shared_encoder()
    folder = cache / f"{name}-{concepts_digest(concepts)[:16]}"
    dense, _ = cached_index(folder, concepts)
    bm25 = _Memo(CandidateIndex(concepts), "search")
    dense_m = _Memo(dense, "concept_scores")
    base = Retriever(concepts, mode="fused", dense=dense_m, encoder=encoder, bm25=bm25, depth=depth)
    out: dict = {"concepts": len(concepts)}
    for split in ("dev", "test"):
        queries = task.split(split)
        mentions, golds = [q.mention for q in queries], [q.gold for q in queries]
        qfile = folder / f"{split}_queries.npy"
        if qfile.is_file():
            qv = np.load(qfile)
        else:
            qv = encoder.encode(mentions)
            np.save(qfile, qv)
        res: dict = {"n": len(queries)}
        res["bm25"] = _recall([[c for c, _ in h] for h in bm25.search(mentions, 100)], golds)
        top = np.argsort(-dense_m.concept_scores(qv), axis=1, kind="stable")[:, :100]
        res["dense"] = _recall([[dense.ids[i] for i in row] for row in top], golds)
        res["grid"] = []
        for w_bm25, rrf_k in grid:
            # a shallow copy shares the exact and variant tables (1 s to build on ICD-10-CM)
            r = copy.copy(base)
            r.w_bm25, r.rrf_k = w_bm25, rrf_k
            t0 = time.perf_counter()
            hits = r.search(mentions, 100, query_vectors=qv)
            res["grid"].append(
                {
                    "w_bm25": w_bm25,
                    "rrf_k": rrf_k,
                    "recall": _recall([[c for c, _ in h] for h in hits], golds),
                    "search_s": round(time.perf_counter() - t0, 2),
                }
            )
        out[split] = res
        print(name, split, "done", flush=True)
    return out


def floor(res: dict) -> dict[str, float]:
    """The better of BM25 and dense alone at each k."""
    return {k: max(res["bm25"][k], res["dense"][k]) for k in res["bm25"]}


def passes(res: dict, point: tuple[float, float]) -> bool:
    """Whether a grid point's recall at k = 1, 10 and 25 is at least the
    better of BM25 and dense alone on this split."""
    bar = floor(res)
    g = next(g for g in res["grid"] if (g["w_bm25"], g["rrf_k"]) == point)
    return all(g["recall"][k] >= bar[k] for k in GUARDED)


def choose(record: dict) -> tuple[float, float] | None:
    """One setting for every task (they are service-wide settings): of the
    grid points that pass on every task's dev, the best mean dev recall@10
    (then @25, then @1); None when none passes."""
    tasks = list(record["tasks"].values())
    points = [(g["w_bm25"], g["rrf_k"]) for g in tasks[0]["dev"]["grid"]]

    def mean(point: tuple[float, float], k: str) -> float:
        return sum(
            next(g for g in t["dev"]["grid"] if (g["w_bm25"], g["rrf_k"]) == point)["recall"][k]
            for t in tasks
        ) / len(tasks)

    ok = [p for p in points if all(passes(t["dev"], p) for t in tasks)]
    if not ok:
        return None
    return max(ok, key=lambda p: (mean(p, "10"), mean(p, "25"), mean(p, "1")))


def table(record: dict, points: list[tuple[float, float]] | None = None) -> str:
    """The grid as markdown; ``points``: only these grid points and the
    chosen one (all when None)."""
    rows = [
        "| task | split | retriever | recall@1 | recall@10 | recall@25 | recall@100 | "
        "not below both at 1/10/25 |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cells(r: dict) -> str:
        return " | ".join(f"{r[str(k)]:.3f}" for k in KS)

    chosen = choose(record)
    for task, res in record["tasks"].items():
        for split in ("dev", "test"):
            s = res[split]
            rows.append(f"| {task} | {split} | BM25 | {cells(s['bm25'])} | |")
            rows.append(f"| {task} | {split} | dense zero-shot | {cells(s['dense'])} | |")
            for g in s["grid"]:
                point = (g["w_bm25"], g["rrf_k"])
                if points is not None and point not in points and point != chosen:
                    continue
                mark = "yes" if passes(s, point) else "no"
                pick = " (chosen on dev)" if point == chosen else ""
                rows.append(
                    f"| {task} | {split} | fused w_bm25 {point[0]:g}, k {point[1]:g}{pick} | "
                    f"{cells(g['recall'])} | {mark} |"
                )
    rows += ["", f"Chosen on dev for every task: w_bm25, rrf_k = {chosen}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["hpo", "icd10cm"])
    p.add_argument("--w-bm25", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--rrf-k", nargs="+", type=float, default=[1.0, 2.0, 5.0, 10.0, 60.0])
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--cache", type=Path, default=Path("/tmp/kronlink-retrieval-cache"))
    p.add_argument("--json", type=Path, default=Path("results/retrieval/fusion_grid.json"))
    p.add_argument("--table", type=Path, help="print the markdown table of a record and exit")
    p.add_argument(
        "--points",
        nargs="+",
        metavar="W,K",
        help="with --table: only these grid points (w_bm25,rrf_k) beside the chosen one",
    )
    a = p.parse_args(argv)
    if a.table:
        pts = [tuple(float(x) for x in pt.split(",")) for pt in a.points] if a.points else None
        print(table(json.loads(a.table.read_text()), pts))
        return 0
    from kronlink.retrieval import encoder_version

    grid = [(w, k) for k in a.rrf_k for w in a.w_bm25]
    record = {
        "command": " ".join(sys.argv),
        "encoder": encoder_version(),
        "depth": a.depth,
        "split": "dev and test, seed 0, by mention",
        "loadavg_before": loadavg(),
        "cpus": os.cpu_count(),
        "tasks": {},
    }
    for name in a.tasks:
        record["tasks"][name] = measure(name, a.cache, grid, a.depth)
        write_record(a.json, record)
    print(table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
