"""How long the demo's dense indexes would take to build: ``Encoder.encode``
on a seeded sample of the demo ontologies' entries (names and stored
synonyms), per variant (torch threads, batch size), extrapolated to the whole
entry count. Run under the bench lock:

    flock /tmp/kronlink-bench.lock python bench/dense_encode.py \\
        results/retrieval/dense_encode.json --tasks DEMO/tasks

Ratios are against the default variant measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from _record import loadavg, write_record

from kronlink.data.io import load_task
from kronlink.retrieval.dense import Encoder, _entries

VARIANTS = [  # (label, torch threads, batch size)
    ("default (batch 256)", None, 256),
    ("batch 64", None, 64),
    ("batch 1024", None, 1024),
    ("1 thread, batch 256", 1, 256),
    ("default again", None, 256),  # the load drifts: the first and last rows bound it
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--tasks", type=Path, required=True)
    p.add_argument("--sample", type=int, default=2000)
    args = p.parse_args()
    record: dict = {"loadavg_before": loadavg()}
    entries: dict[str, list[str]] = {}
    for name in ("icd10cm", "hpo"):
        texts, _ = _entries(load_task(args.tasks / name).concepts)
        entries[name] = texts
    total = sum(len(t) for t in entries.values())
    pool = [t for ts in entries.values() for t in ts]
    sample = random.Random(0).sample(pool, args.sample)
    record.update(
        entries={k: len(v) for k, v in entries.items()},
        sample=args.sample,
        torch_threads_default=torch.get_num_threads(),
    )
    t0 = time.perf_counter()
    enc = Encoder()
    record["encoder_load_s"] = round(time.perf_counter() - t0, 2)
    enc.encode(sample[:64])  # first-call costs
    default_threads = torch.get_num_threads()
    rows = []
    for label, threads, batch in VARIANTS:
        torch.set_num_threads(threads or default_threads)
        enc.batch_size = batch
        t0 = time.perf_counter()
        enc.encode(sample)
        s = time.perf_counter() - t0
        rows.append(
            {
                "variant": label,
                "seconds": round(s, 2),
                "entries_per_s": round(args.sample / s, 1),
                "extrapolated_demo_s": round(total * s / args.sample),
            }
        )
        print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    base = rows[0]["seconds"]
    for r in rows:
        r["ratio_to_default"] = round(r["seconds"] / base, 3)
    record["rows"] = rows
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
