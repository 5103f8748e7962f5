"""The /v1/link tables of docs/benchmarks.md, from bench/link.py's JSON records
(and the process CPU accounting bench/link.py measures with).

python bench/link_table.py results/bench/link-cnn.json results/bench/link-transformer.json
python bench/link_table.py results/bench/link-fused-vs-bm25.json   # + the retriever modes
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of a process and its descendants (Linux /proc)."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended since
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _ratio(row: dict[str, Any]) -> str:
    """The row's service / in-process, and the range over its rounds when there are several."""
    s, i = row["service"], row["in_process"]
    text = f"{s['qps'] / i['qps']:.0%}"
    rounds = row.get("rounds") or []
    if len(rounds) > 1:
        rs = [r["service"]["qps"] / r["in_process"]["qps"] for r in rounds]
        text += f" ({min(rs):.0%}-{max(rs):.0%})"
    return text


def render(records: list[dict[str, Any]]) -> str:
    out = []
    for rec in records:
        m = rec["machine"]
        lb, la = m["loadavg_before"], m["loadavg_after"]
        out.append(
            f"**{rec['model']}**, candidates: {rec['candidates']} from "
            f"{rec['candidates_from']}; {rec['workers']} server process(es), "
            f"{rec.get('client', 'httpx')} clients, "
            f"{rec['threads']} torch thread(s); "
            f"{'lean /v1/link path' if rec.get('link_fast_path') else 'FastAPI route only'}; "
            f"{rec['duration_s']:g} s a point"
            + (
                f", {rec['rounds']} rounds alternating (the row: the round of median ratio)"
                if rec.get("rounds", 1) > 1
                else ""
            )
            + "; "
            f"{m['cpus']} CPUs, torch {m['torch']}; load average {lb[0]:.1f} before, "
            f"{la[0]:.1f} after (1 min)\n"
        )
        out.append(
            "| route | clients | queries/request | service q/s | p50 ms | p99 ms | 429s "
            "| in-process q/s (batch) | p50 ms | p99 ms | service / in-process "
            "| queries per model call | model call ms | CPU ms/query: service | in-process "
            "| client |"
        )
        out.append(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for row in rec["rows"]:
            s, i = row["service"], row["in_process"]
            c, per = row["clients"], row["per_request"]
            batch = per if row["route"].startswith("/v1/link/batch") else c
            out.append(
                f"| {row['route']} | {c} | {per} | {s['qps']:.1f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {s.get('rejected', 0)} | {i['qps']:.1f} ({batch}) "
                f"| {i['p50_ms']:.1f} | {i['p99_ms']:.1f} | {_ratio(row)} "
                f"| {s['batch']:.1f} | {s['model_ms']:.1f} | {s['cpu_ms']:.2f} | {i['cpu_ms']:.2f} "
                f"| {s.get('client_cpu_ms', 0):.2f} |"
            )
        out.append("")
        if len(rec.get("retrievers") or []) > 1:
            out.append(render_retrievers(rec))
    return "\n".join(out)


def render_retrievers(rec: dict[str, Any]) -> str:
    """Each retriever mode's /v1/link p50 and p99 (median over the rounds), the
    ratio of its p50 to the first mode's in the same round (median, range), and
    the in-process parts of the path (medians over the rounds, ms per batch)."""
    modes = rec["retrievers"]
    base = modes[0]
    reg = rec.get("registration") or {}
    out = [
        f"Retriever modes on one registered version and ontology ({rec['model']}; ratios to "
        f"**{base}**, each round's ratio from the same round; medians over "
        f"{rec.get('rounds', 1)} round(s)). Registering the ontology's dense index: "
        + (
            f"{reg['dense_build_s']:g} s for {reg['dense_entries']:,} entries "
            f"(encoder load {reg['encoder_load_s']:g} s, {reg['torch_threads']} torch "
            f"thread(s), load {reg['loadavg_1min']:.1f})\n"
            if "dense_build_s" in reg
            else "not built\n"
        ),
        "| retriever | clients | p50 ms | p99 ms | q/s | p50 / "
        + base
        + " (range) | in-process: batch ms | retrieve ms | of which: query encode ms "
        "| dense scores ms | BM25 search ms | model call ms (service) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rec["rows"]:
        route = row["route"]
        if route.startswith("/v1/link (") and row.get("rounds"):
            by[(route[len("/v1/link (") : -1], row["clients"])] = row
    med = statistics.median
    for c in sorted({c for _, c in by}):
        if (base, c) not in by:
            continue
        base_p50 = [r["service"]["p50_ms"] for r in by[(base, c)]["rounds"]]
        for mode in modes:
            rr = by[(mode, c)]["rounds"]
            svc = [r["service"] for r in rr]
            ref = [r["in_process"] for r in rr]
            ratios = [s["p50_ms"] / b for s, b in zip(svc, base_p50, strict=True)]
            out.append(
                f"| {mode} | {c} | {med(s['p50_ms'] for s in svc):.1f} "
                f"| {med(s['p99_ms'] for s in svc):.1f} | {med(s['qps'] for s in svc):.1f} "
                f"| {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {med(i['p50_ms'] for i in ref):.1f} "
                f"| {med(i.get('retrieve_ms', 0) for i in ref):.2f} "
                f"| {med(i.get('query_encode_ms', 0) for i in ref):.2f} "
                f"| {med(i.get('dense_scores_ms', 0) for i in ref):.2f} "
                f"| {med(i.get('bm25_ms', 0) for i in ref):.2f} "
                f"| {med(s['model_ms'] for s in svc):.1f} |"
            )
    loads = [r["loadavg_1min"] for row in by.values() for r in row["rounds"]]
    out.append(f"\nLoad average (1 min) over the rounds: {min(loads):.1f} to {max(loads):.1f}.\n")
    return "\n".join(out)


START, END = "<!-- bench/link_table.py -->", "<!-- end bench/link_table.py -->"


def main(argv: list[str]) -> int:
    docs = None
    if argv[:1] == ["--docs"]:
        docs, argv = Path(argv[1]), argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tables = render([json.loads(Path(a).read_text()) for a in argv])
    if docs is None:
        print(tables)
        return 0
    text = docs.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{START}\n{tables}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
