"""Two processes storing the same run at once (issue 14, item 5): runs side by
side, or a resumed experiment racing the one it resumes. With one fixed temp
name per record, one writer's rename publishes or steals the other's
half-written file; each writer must have its own."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import torch

from kronlink.experiments.store import RunStore, spec_id

SPEC = {"kind": "train", "task": "icd10cm", "seed": 3}


def _writer(root: str, tag: int, rounds: int, errors: mp.Queue) -> None:
    store = RunStore(root)
    # Large enough that a write is not one syscall: a torn file would show.
    payload = {"tag": tag, "ranks": list(range(20_000))}
    model = torch.nn.Linear(64, 64)
    try:
        for _ in range(rounds):
            store.put("train", SPEC, payload)
            store.save_weights(spec_id(SPEC), model)
    except Exception as e:  # reported to the parent, which asserts none
        errors.put(repr(e))


def test_two_processes_store_the_same_run_without_collision(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    errors: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), t, 60, errors)) for t in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []

    store = RunStore(tmp_path)
    record = store.get("train", SPEC)
    assert record is not None and record["tag"] in (1, 2)
    assert record["ranks"] == list(range(20_000))
    weights = store.load_weights(spec_id(SPEC))
    assert weights is not None and weights["weight"].shape == (64, 64)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    json.loads(store.record_path("train", spec_id(SPEC)).read_text())
