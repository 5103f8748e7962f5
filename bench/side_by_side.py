"""Wall time of one small experiment run with ``kronlink experiment --workers N``
for each N (issue 14, item 5: runs side by side).

    flock /tmp/kronlink-bench.lock .venv/bin/python bench/side_by_side.py \\
        --workers 1,2 --repeats 2 --threads 1 --json results/bench/side_by_side_cpu.json
    .venv/bin/python bench/side_by_side.py --from-json results/bench/side_by_side_cpu.json \\
        [--docs docs/benchmarks.md]

The experiment: three synthetic tasks (made-up concept names, mentions with
one word swapped for an alias, as the experiment tests use), a small CNN,
tier 1 on each task and tier 2 on all six orderings with none and KFC at two
λ: 21 training runs and 3 curvature states, the states shared by the cells
that start from the same tier-1 model. Each (N, repeat) is a fresh results
folder and a fresh ``kronlink experiment`` process, timed whole (imports and
worker start-up included); the repeats alternate the N values so drift on a
shared machine hits all of them. The record also says whether every N stored
the same numbers as the first (metrics and per-query ranks, to 1e-6): each
run is seeded, so they must, as long as every process computes with the same
number of threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import loadavg, write_record

REPO = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "da", "fo"]
START, END = "<!-- bench/side_by_side.py -->", "<!-- end bench/side_by_side.py -->"

CONFIG = """
name = "bench"
results = "{results}"
seeds = [0]
device = "cpu"

[tasks]
names = ["alpha", "beta", "gamma"]
dirs = {{ alpha = "{tasks}/alpha", beta = "{tasks}/beta", gamma = "{tasks}/gamma" }}

[curvature]
batch_size = 32

[selection]
grid = [0.1, 10.0]

[rankers.cnn]
kind = "cnn"
model = {{ tokenizer = "none", embedding_dim = 16, channels = 16, hidden_size = 16, dropout = 0.0, max_query_length = 24, max_name_length = 12 }}
train = {{ epochs = {epochs}, batch_size = 8, lr = 3e-3, head_lr = 3e-3 }}
tiers = ["tier1", "tier2"]
tier2_methods = ["none", "kfc"]

[tier2]
layers = false

[early]
ordering = ["alpha", "beta"]
"""


def write_tasks(root: Path, concepts: int, per_concept: int) -> None:
    from kronlink.data.builders._assemble import assemble_task
    from kronlink.data.io import save_task
    from kronlink.data.schema import Concept, Query

    for seed, name in enumerate(("alpha", "beta", "gamma")):
        rng = random.Random(seed)

        def word(rng: random.Random = rng) -> str:
            return "".join(rng.choice(SYLLABLES) for _ in range(3))

        items, mentions = [], []
        for c in range(concepts):
            words = [word() for _ in range(3)]
            cid = f"{name.upper()}:{c}"
            items.append(Concept(cid, " ".join(words)))
            for i in range(per_concept):
                w = list(words)
                w[i % 3] = word()
                mentions.append(Query(mention=" ".join(w), gold=cid))
        task = assemble_task(name, items, mentions, seed=0, split_rule="mention", k=4, meta={})
        save_task(task, root / name)


def numbers(results: Path) -> dict[str, Any]:
    out = {}
    for path in sorted((results / "runs").glob("*/*.json")):
        rec = json.loads(path.read_text())
        out[f"{rec['kind']} {rec['id']}"] = rec.get("metrics") or rec.get("n_examples")
    return out


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol or (a != a and b != b)
    return a == b


def run_once(
    tmp: Path, tasks: Path, workers: int, threads: int | None, epochs: int, tag: str
) -> dict[str, Any]:
    results = tmp / f"results-{tag}"
    cfg = tmp / f"{tag}.toml"
    cfg.write_text(CONFIG.format(results=results, tasks=tasks, epochs=epochs))
    cmd = [sys.executable, "-m", "kronlink.cli", "experiment", str(cfg), "--workers", str(workers)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"--workers {workers} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"workers": workers, "seconds": seconds, "ran": summary["ran"], "results": results}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    levels = [int(w) for w in args.workers.split(",")]
    record: dict[str, Any] = {
        "bench": "side_by_side",
        "command": " ".join(sys.argv),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "loadavg_before": loadavg(),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "torch_threads_default": torch.get_num_threads(),
        },
        "threads": args.threads,
        "experiment": {"concepts": args.concepts, "per_concept": args.per_concept,
                       "epochs": args.epochs, "runs": None},
    }  # fmt: skip
    rounds = []
    with tempfile.TemporaryDirectory(prefix="kronlink-sbs-") as d:
        tmp = Path(d)
        write_tasks(tmp / "tasks", args.concepts, args.per_concept)
        reference = None
        for r in range(args.repeats):
            order = levels if r % 2 == 0 else levels[::-1]
            for w in order:
                row = run_once(tmp, tmp / "tasks", w, args.threads, args.epochs, f"w{w}-r{r}")
                got = numbers(row.pop("results"))
                reference = reference or got
                row["same_numbers"] = close(got, reference)
                row["round"] = r
                row["loadavg"] = loadavg()
                rounds.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    record["experiment"]["runs"] = rounds[0]["ran"]
    record["rounds"] = rounds
    record["rows"] = [
        {
            "workers": w,
            "seconds_median": statistics.median(x["seconds"] for x in rounds if x["workers"] == w),
            "seconds_all": [round(x["seconds"], 1) for x in rounds if x["workers"] == w],
            "same_numbers": all(x["same_numbers"] for x in rounds if x["workers"] == w),
        }
        for w in levels
    ]
    return record


def render(rec: dict[str, Any]) -> str:
    m, e = rec["machine"], rec["experiment"]
    base = next(r for r in rec["rows"] if r["workers"] == 1)["seconds_median"]
    lines = [
        f"{e['runs']} training runs (tier 1 and tier 2 of three synthetic tasks, "
        f"{e['concepts']} concepts x {e['per_concept']} mentions each, a 16-wide CNN, "
        f"{e['epochs']} epochs); {m['cpus']} CPUs, torch {m['torch']}"
        + (f", commit {rec['commit']}" if rec.get("commit") else "")
        + "; load average "
        f"{rec['loadavg_before'][0]} before, {rec['loadavg_after'][0]} after (1 min); "
        f"each `kronlink experiment` process timed whole, {len(rec['rows'][0]['seconds_all'])} "
        "rounds alternating",
        "",
        "| --workers | torch threads each | wall s (median) | all rounds | speed-up | same numbers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        threads = rec.get("threads") or (
            m["torch_threads_default"] if r["workers"] == 1 else max(1, m["cpus"] // r["workers"])
        )
        lines.append(
            f"| {r['workers']} | {threads} | {r['seconds_median']:.1f} | "
            f"{', '.join(f'{s:.1f}' for s in r['seconds_all'])} | "
            f"{base / r['seconds_median']:.2f}x | {'yes' if r['same_numbers'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--concepts", type=int, default=40)
    p.add_argument("--per-concept", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="kronlink experiment --threads (default: its own: torch's for one process, "
        "cores // N for N workers)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None)
    p.add_argument("--docs", type=Path, default=None)
    args = p.parse_args(argv)
    if args.from_json is not None:
        records = [json.loads(path.read_text()) for path in args.from_json]
    else:
        rec = measure(args)
        if args.json is not None:
            write_record(args.json, rec)
        else:
            rec["loadavg_after"] = loadavg()
        records = [rec]
    table = "\n\n".join(render(rec) for rec in records)
    if args.docs is None:
        print(table)
        return 0
    text = args.docs.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.docs.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
