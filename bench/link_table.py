"""The /v1/link tables of docs/benchmarks.md, from bench/link.py's JSON records
(and the process CPU accounting bench/link.py measures with).

python bench/link_table.py results/bench/link-cnn.json results/bench/link-transformer.json
"""

from __future__ import annotations

import json
import os
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
            batch = c if row["route"] == "/v1/link" else per
            out.append(
                f"| {row['route']} | {c} | {per} | {s['qps']:.1f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {s.get('rejected', 0)} | {i['qps']:.1f} ({batch}) "
                f"| {i['p50_ms']:.1f} | {i['p99_ms']:.1f} | {_ratio(row)} "
                f"| {s['batch']:.1f} | {s['model_ms']:.1f} | {s['cpu_ms']:.2f} | {i['cpu_ms']:.2f} "
                f"| {s.get('client_cpu_ms', 0):.2f} |"
            )
        out.append("")
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
