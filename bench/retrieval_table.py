"""Recall@1/10/25/100 of BM25, dense zero-shot and the fused retriever on the
test splits of `kronlink build-tasks` (seed 0, split by mention), over the
stored ontology (names and definitions only since issue 12 item 0).

    python bench/retrieval_table.py --tasks hpo icd10cm --json results/retrieval/recall.json
    python bench/retrieval_table.py --table results/retrieval/recall.json   # markdown

Concept and query vectors are cached under --cache (encoding ~47k ICD-10-CM
names with MiniLM takes minutes on 2 CPU cores), keyed by the encoder version
and a digest of what was encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

KS = (1, 10, 25, 100)


def _recall(ranked: list[list[str]], golds: list[str]) -> dict[str, float]:
    return {
        str(k): round(sum(g in r[:k] for r, g in zip(ranked, golds, strict=True)) / len(golds), 4)
        for k in KS
    }


def cached_index(folder: Path, concepts: list) -> tuple:
    """The dense index of ``concepts`` from ``folder``, or built and saved
    there; with its build time in seconds (None when it was read)."""
    from kronlink.retrieval import DenseIndex, shared_encoder

    encoder = shared_encoder()
    if (folder / "dense.json").is_file():
        return DenseIndex.load(folder, expect_encoder=encoder.version), None
    t0 = time.perf_counter()
    dense = DenseIndex.build(concepts, encoder)
    index_s = round(time.perf_counter() - t0, 1)
    dense.save(folder)
    return dense, index_s


def measure(name: str, cache: Path, settings: dict) -> dict:
    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.retrieval import Retriever, shared_encoder
    from kronlink.retrieval.dense import concepts_digest

    t0 = time.perf_counter()
    task = build_task(name, seed=0, split_rule="mention", k=10)
    build_s = time.perf_counter() - t0
    concepts = list(task.concepts)
    test = task.split("test")
    mentions, golds = [q.mention for q in test], [q.gold for q in test]
    encoder = shared_encoder()
    folder = cache / f"{name}-{concepts_digest(concepts)[:16]}"
    dense, index_s = cached_index(folder, concepts)
    qfile = folder / "test_queries.npy"
    if qfile.is_file():
        qv = np.load(qfile)
    else:
        qv = encoder.encode(mentions)
        np.save(qfile, qv)
    bm25 = CandidateIndex(concepts)
    out: dict = {
        "concepts": len(concepts),
        "entries": len(dense.vectors),
        "test_queries": len(test),
        "build_task_s": round(build_s, 1),
        "dense_index_s": index_s,
    }
    out["bm25"] = _recall([[c for c, _ in h] for h in bm25.search(mentions, 100)], golds)
    scores = dense.concept_scores(qv)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    out["dense_zero_shot"] = _recall([[dense.ids[i] for i in row] for row in top], golds)
    for label, w in (
        ("fused_rrf60_equal", dict(w_dense=1.0, w_bm25=1.0, rrf_k=60.0)),
        (
            "fused",
            dict(w_dense=settings["w_dense"], w_bm25=settings["w_bm25"], rrf_k=settings["rrf_k"]),
        ),
    ):
        r = Retriever(
            concepts,
            mode="fused",
            dense=dense,
            encoder=encoder,
            bm25=bm25,
            depth=settings["depth"],
            **w,
        )
        hits = r.search(mentions, 100, query_vectors=qv)
        out[label] = _recall([[c for c, _ in h] for h in hits], golds)
    out["clinical"] = clinical(name, concepts, dense, bm25, encoder, settings)
    return out


def clinical(name, concepts, dense, bm25, encoder, settings) -> dict:
    """Top-1 and recall@10 on tests/clinical_mentions.py (accepted codes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from clinical_mentions import LISTS, accepted

    from kronlink.retrieval import Retriever

    items = LISTS[name]
    mentions = list(items)
    qv = encoder.encode(mentions)
    out = {"n": len(items)}
    for label, mode in (("bm25", "bm25"), ("fused", "fused")):
        r = Retriever(
            concepts,
            mode=mode,
            dense=dense,
            encoder=encoder,
            bm25=bm25,
            w_dense=settings["w_dense"],
            w_bm25=settings["w_bm25"],
            rrf_k=settings["rrf_k"],
            depth=settings["depth"],
        )
        hits = r.search(mentions, 10, query_vectors=qv)
        out[label] = {
            "top1": sum(accepted(h[0][0], items[m]) for m, h in zip(mentions, hits, strict=True)),
            "recall10": sum(
                any(accepted(c, items[m]) for c, _ in h)
                for m, h in zip(mentions, hits, strict=True)
            ),
        }
    top = dense.concept_scores(qv).argmax(1)
    out["dense_zero_shot"] = {
        "top1": sum(accepted(dense.ids[i], items[m]) for m, i in zip(mentions, top, strict=True))
    }
    return out


def table(record: dict) -> str:
    rows = [
        "| task | retriever | recall@1 | recall@10 | recall@25 | recall@100 |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "bm25": "BM25",
        "dense_zero_shot": "dense zero-shot (MiniLM)",
        "fused_rrf60_equal": "plain RRF (k = 60, equal weights)",
        "fused": "fused (weighted RRF, the retriever)",
    }
    for task, res in record["tasks"].items():
        for key, label in labels.items():
            r = res[key]
            rows.append(
                f"| {task} | {label} | " + " | ".join(f"{r[str(k)]:.3f}" for k in KS) + " |"
            )
    rows += [
        "",
        "Clinical list (tests/clinical_mentions.py), right answers out of n:",
        "",
        "| task | n | BM25 top-1 | dense top-1 | fused top-1 | BM25 recall@10 | fused recall@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, res in record["tasks"].items():
        c = res.get("clinical")
        if c:
            rows.append(
                f"| {task} | {c['n']} | {c['bm25']['top1']} | {c['dense_zero_shot']['top1']} | "
                f"{c['fused']['top1']} | {c['bm25']['recall10']} | {c['fused']['recall10']} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["hpo", "icd10cm"])
    p.add_argument("--cache", type=Path, default=Path("/tmp/kronlink-retrieval-cache"))
    p.add_argument("--json", type=Path, default=Path("results/retrieval/recall.json"))
    p.add_argument("--table", type=Path, help="print the markdown table of a record and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    from kronlink.retrieval import encoder_version, fusion_settings
    from kronlink.settings import Settings

    settings = fusion_settings(Settings())
    record = {
        "command": " ".join(sys.argv),
        "encoder": encoder_version(),
        "settings": settings,
        "split": "test, seed 0, by mention",
        "loadavg_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "tasks": {},
    }
    for name in a.tasks:
        record["tasks"][name] = measure(name, a.cache, settings)
        print(name, json.dumps(record["tasks"][name]), flush=True)
        # written after each task: ICD-10-CM's encoding takes long on a shared machine
        record["loadavg_after"] = os.getloadavg()
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
