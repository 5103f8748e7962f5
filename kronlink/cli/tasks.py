"""``kronlink build-tasks``: real tasks from ontology data shipped in PyPI packages."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kronlink.errors import KronlinkError


def run(args: argparse.Namespace) -> int:
    from kronlink.data.builders import BUILDERS, build_task
    from kronlink.data.io import save_task

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise KronlinkError(
            f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(BUILDERS))}"
        )
    out = Path(args.out)
    for name in names:
        t0 = time.perf_counter()
        print(f"building {name} ...", file=sys.stderr)
        task = build_task(
            name, seed=args.seed, split_rule=args.split, k=args.candidates, limit=args.limit
        )
        save_task(task, out / name)
        sizes = {s: len(task.split(s)) for s in ("train", "dev", "test")}
        print(
            json.dumps(
                {
                    "task": name,
                    "dir": str(out / name),
                    "concepts": len(task.concepts),
                    "queries": sizes,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "build-tasks",
        help="build real tasks from ontology data shipped in PyPI packages",
        description="Write one folder per task with ontology.jsonl, queries.jsonl and task.json.",
    )
    b.add_argument("--out", required=True, help="folder to write the task folders into")
    b.add_argument(
        "--tasks", default="icd10cm,hpo", help="comma-separated task names (default: %(default)s)"
    )
    b.add_argument(
        "--split",
        choices=["mention", "concept"],
        default="mention",
        help="split rule: by mention (the paper's) or by concept (default: %(default)s)",
    )
    b.add_argument(
        "--candidates", type=int, default=25, help="candidates per query (default: %(default)s)"
    )
    b.add_argument(
        "--limit", type=int, default=None, help="keep at most this many queries per task"
    )
    b.add_argument(
        "--seed", type=int, default=0, help="split and shuffle seed (default: %(default)s)"
    )
    b.set_defaults(func=run)
