"""Bytes on disk of what ``retriever_tune`` stores: one task's tower state
(``TaskState.save`` in fp32 and bf16, the job's ``state_dtype``) and the tuned
tower a version carries (``QueryTower.save``).

    python bench/retriever_state_size.py [--json results/retrieval/retriever_state_size.json]
    python bench/retriever_state_size.py --table results/retrieval/retriever_state_size.json

The sizes depend on the shapes (6-layer, 384-wide MiniLM), not on the data, so
a small synthetic bank and 32 mentions are enough: ``learn_retriever_task`` as
the worker calls it, one epoch, curvature on the 32 mentions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure() -> dict:
    import numpy as np
    import torch

    from kronlink.data.schema import Query
    from kronlink.retrieval.dense import DenseIndex, encoder_version
    from kronlink.retrieval.learn import RetrieverLearnConfig, learn_retriever_task
    from kronlink.retrieval.tower import QueryTower, TuneConfig

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bank = DenseIndex(vectors, np.arange(50), [f"C{i}" for i in range(50)], encoder_version())
    train = [Query(mention=f"word{i} pain", gold=f"C{i % 50}") for i in range(32)]
    config = RetrieverLearnConfig(tune=TuneConfig(epochs=1, eval_k=1), curvature_queries=32)
    update = learn_retriever_task(QueryTower.build(), bank, train, train[:8], [], config)
    out: dict = {"bench": "tower_state_size", "bytes": {}}
    with tempfile.TemporaryDirectory() as d:
        for name, dtype in (
            ("task_state_fp32", torch.float32),
            ("task_state_bf16", torch.bfloat16),
        ):
            path = Path(d) / f"{name}.safetensors"
            update.state.save(path, dtype=dtype)
            out["bytes"][name] = path.stat().st_size
        update.tower.save(Path(d) / "tower")
        out["bytes"]["tower"] = sum(p.stat().st_size for p in (Path(d) / "tower").iterdir())
    out["parameters"] = sum(p.numel() for p in update.tower.encoder.parameters())
    return out


def table(record: dict) -> str:
    rows = ["| what | MB |", "|---|---:|"]
    names = {
        "task_state_fp32": "a task's tower state, fp32 factors",
        "task_state_bf16": "a task's tower state, bf16 factors (anchor kept fp32)",
        "tower": "the tuned tower, in every version's folder",
    }
    rows += [f"| {names[k]} | {v / 1e6:.1f} |" for k, v in record["bytes"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=Path("results/retrieval/retriever_state_size.json"))
    p.add_argument("--table", type=Path, help="print the table of a record and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    record = measure()
    a.json.write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
