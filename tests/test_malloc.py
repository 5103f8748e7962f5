"""kronlink/_malloc.py: with glibc keeping freed memory, a training loop stops
faulting its pages in again every step, and its peak memory stays as it was.
Counted in fresh subprocesses, since the setting is process-wide."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

# A small training loop whose step allocates and frees megabytes (an
# embedding's dense gradient, activations, AdamW's temporaries), as a
# ranker's step does.
CHILD = """
import json, resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from kronlink._malloc import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Embedding(30522, 128), torch.nn.Flatten(),
    torch.nn.Linear(128 * 32, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1),
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
per_step = []
for _ in range(12):
    x = torch.randint(0, 30522, (400, 32))
    before = faults()
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    per_step.append(faults() - before)
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"faults": per_step, "peak_mib": peak_mib}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_loop_stops_faulting_its_memory_in_again() -> None:
    default, keep = _run("default"), _run("keep")
    steady = slice(4, None)  # after the first steps reach their peak
    assert statistics.median(default["faults"][steady]) > 5000, default
    # the median: a late step may still grow the heap once (one CI run had a
    # single 4.6k-fault step among zeros)
    assert statistics.median(keep["faults"][steady]) < 500, keep
    assert keep["peak_mib"] <= 1.2 * default["peak_mib"] + 50, (default, keep)
