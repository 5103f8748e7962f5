"""Index build time, memory and stored bytes per 10,000 concepts (issue 12):
the dense MiniLM index (``DenseIndex.build``, what the worker builds when it
registers an ontology in fused mode) and, in the same run, the BM25
retriever the service builds (``Retriever(mode="bm25")``: BM25 plus the
exact-name map).

    flock /tmp/kronlink-bench.lock nice python bench/index_build.py \\
        results/retrieval/index_build.json
    python bench/index_build.py --table results/retrieval/index_build.json

The concepts are a seeded sample of the real ontologies (ICD-10-CM 2026 and
HPO as the builders parse them, every stored synonym kept: the most a stored
ontology can hold), at the sizes given; each build runs in a fresh child
process. Peak RSS growth is the child's peak during the build (VmHWM, reset
just before it through /proc/self/clear_refs) minus its RSS just before the
build (after the imports, the concepts and, for dense, the encoder are
loaded). Per 10,000 figures are
linear extrapolations from the samples (the encode is per entry, so it is
linear; the table shows each size so the reader can check).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import reset_peak, status_kib
from _record import loadavg, write_record

BENCH = Path(__file__).resolve()


def child(kind: str, path: Path) -> dict:
    """One build in this (fresh) process; returns its measurements."""
    import torch

    from kronlink.data.io import read_ontology

    concepts = read_ontology(path)
    out: dict = {"kind": kind, "concepts": len(concepts), "torch_threads": torch.get_num_threads()}
    if kind == "dense":
        from kronlink.retrieval.dense import DenseIndex, Encoder, _entries

        t0 = time.perf_counter()
        encoder = Encoder()
        encoder.encode(["warm up"])  # first-call costs
        out["encoder_load_s"] = round(time.perf_counter() - t0, 2)
        out["entries"] = len(_entries(concepts)[0])
        before, out["peak_reset"] = status_kib("VmRSS") or 0, reset_peak()
        t0 = time.perf_counter()
        index = DenseIndex.build(concepts, encoder)
        out["build_s"] = round(time.perf_counter() - t0, 3)
        folder = Path(tempfile.mkdtemp(prefix="kronlink-dense-"))
        try:
            index.save(folder)
            out["artifact_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        finally:
            shutil.rmtree(folder)
    else:
        from kronlink.retrieval import Retriever

        out["entries"] = sum(1 + len(c.synonyms) for c in concepts)
        before, out["peak_reset"] = status_kib("VmRSS") or 0, reset_peak()
        t0 = time.perf_counter()
        Retriever(concepts, mode="bm25")
        out["build_s"] = round(time.perf_counter() - t0, 3)
        out["artifact_bytes"] = 0  # built in memory when the service loads it; nothing stored
    out["rss_before_mib"] = round(before / 1024, 1)
    # VmHWM after a reset is the build's own peak; without one, the process's
    # lifetime peak (an overestimate when loading peaked higher)
    peak = (
        (status_kib("VmHWM") or 0)
        if out["peak_reset"]
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    out["peak_rss_growth_mib"] = round((peak - before) / 1024, 1)
    out["ontology_jsonl_bytes"] = path.stat().st_size
    return out


def pool() -> list:
    from kronlink.data.builders.hpo import hpo_obo_path, parse_hpo
    from kronlink.data.builders.icd10cm import icd10cm_tabular_path, parse_icd10cm

    return parse_icd10cm(icd10cm_tabular_path())[0] + parse_hpo(hpo_obo_path())[0]


def per_10k(row: dict, key: str) -> float:
    return row[key] * 10_000 / row["concepts"]


def table(record: dict) -> str:
    lb, la = record["loadavg_before"], record["loadavg_after"]
    out = [
        f"Seeded samples of ICD-10-CM + HPO concepts ({record['pool_concepts']:,} in all, "
        f"{record['pool_entries']:,} name/synonym entries); one fresh process a build; "
        f"{record['cpus']} CPUs, load average {lb[0]} before, {la[0]} after (1 min). "
        "Per 10,000 concepts, extrapolated linearly from each sample.\n",
        "| index | concepts | entries | build s | s / 10k concepts | entries / s "
        "| peak RSS growth MiB | MiB / 10k concepts | stored bytes / 10k concepts "
        "| torch threads | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        name = "dense (MiniLM)" if r["kind"] == "dense" else "BM25 + exact names"
        stored = f"{per_10k(r, 'artifact_bytes'):,.0f}" if r["artifact_bytes"] else "none"
        out.append(
            f"| {name} | {r['concepts']:,} | {r['entries']:,} | {r['build_s']:.2f} "
            f"| {per_10k(r, 'build_s'):.1f} | {r['entries'] / r['build_s']:,.0f} "
            f"| {r['peak_rss_growth_mib']:.1f} | {per_10k(r, 'peak_rss_growth_mib'):.1f} "
            f"| {stored} | {r['torch_threads']} | {r['loadavg_1min']} |"
        )
    for kind in ("bm25", "dense"):  # what memory grows with, between the sizes
        rows = sorted((r for r in record["rows"] if r["kind"] == kind), key=lambda r: r["concepts"])
        for a, b in itertools.pairwise(rows):
            slope = (b["peak_rss_growth_mib"] - a["peak_rss_growth_mib"]) / (
                b["concepts"] - a["concepts"]
            )
            out.append(
                f"\n{kind}: peak RSS growth rose {slope * 10_000:.1f} MiB per 10k concepts "
                f"from {a['concepts']:,} to {b['concepts']:,} concepts."
            )
    dense = [r for r in record["rows"] if r["kind"] == "dense"]
    if dense:
        out.append(
            f"\nThe encoder itself (loaded once a process): {dense[0]['encoder_load_s']} s; "
            "the concepts file (ontology.jsonl, stored in both modes): "
            f"{per_10k(dense[-1], 'ontology_jsonl_bytes'):,.0f} bytes / 10k concepts."
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--dense-sizes", default="1000,3000", help="concepts a dense sample")
    p.add_argument("--bm25-sizes", default="1000,3000,all", help="concepts a BM25 sample")
    p.add_argument("--table", type=Path, help="print the table of a stored record and exit")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ONTOLOGY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.out is None:
        p.error("give the record's path (or --table RECORD)")
    from kronlink.data.io import write_ontology

    record: dict = {
        "bench": "bench/index_build.py",
        "argv": sys.argv[1:],
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    concepts = pool()
    record["pool_concepts"] = len(concepts)
    record["pool_entries"] = sum(1 + len(c.synonyms) for c in concepts)
    plan = [("bm25", s) for s in args.bm25_sizes.split(",")]
    plan += [("dense", s) for s in args.dense_sizes.split(",")]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="kronlink-index-build-"))
    try:
        for kind, size in plan:
            n = len(concepts) if size == "all" else int(size)
            sample = random.Random(0).sample(concepts, n)
            path = scratch / f"{n}.jsonl"
            if not path.exists():
                write_ontology(path, sample)
            paths = (str(BENCH.parents[1]), os.environ.get("PYTHONPATH"))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
            done = subprocess.run(
                [sys.executable, str(BENCH), "--child", kind, str(path)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["loadavg_1min"] = loadavg()[0]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record["rows"] = rows
    write_record(args.out, record)
    print(table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
