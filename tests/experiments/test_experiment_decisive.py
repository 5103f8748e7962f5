"""The decisive experiment's command (experiments/decisive.sh) in its CPU
smoke form: inputs prepared under the carry limit with the encoder in fp16,
the dry run, a run that writes every record with per-query ranks and the
endpoint report, a rerun that runs nothing, and a deadline that starts no run
that would not fit. The real encoder (1 layer of the installed MiniLM) on
tiny tasks named like the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experiment_helpers import tiny_task
from safetensors.torch import load_file

from kronlink.data.io import save_task
from kronlink.experiments import run_experiment
from kronlink.experiments.decisive import (
    CARRY_LIMIT,
    _main,
    folder_bytes,
    instantiate,
    plan,
    prepare_encoder,
    prepare_tasks,
)
from kronlink.models._text import default_encoder_path

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("icd10cm", "hpo", "drugs")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("decisive")
    built = tmp / "built"
    for i, name in enumerate(NAMES):
        save_task(tiny_task(name, seed=i), built / name)
    out = tmp / "inputs"
    prepare_tasks({n: built / n for n in NAMES}, out, (8, 4, 6))
    prepare_encoder(out, num_layers=1)
    return out


def test_inputs_fit_the_carry_and_the_encoder_is_fp16(inputs: Path, tmp_path: Path) -> None:
    assert folder_bytes(inputs) <= CARRY_LIMIT
    task = json.loads((inputs / "tasks" / "hpo" / "task.json").read_text())
    assert task["sizes"]["queries"] == {"train": 8, "dev": 4, "test": 6}
    rows = [json.loads(x) for x in (inputs / "tasks" / "hpo" / "ontology.jsonl").open()]
    assert rows and all(not r.get("definition") for r in rows)
    # The full config's encoder (3 layers) leaves room for the task subsets
    # (3.4 MiB for the real ones at decisive.toml's sizes).
    full = prepare_encoder(tmp_path, num_layers=3)
    assert full <= CARRY_LIMIT - 16 * 2**20
    half = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    orig = load_file(str(default_encoder_path() / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    for k, v in half.items():  # a rounding of the pretrained weights, nothing more
        torch.testing.assert_close(v.float(), orig[k].float(), rtol=1e-3, atol=1e-4)
    assert not any(".layer.3." in k for k in half)


def test_smoke_command_writes_records_resumes_and_reports(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "PROFILE": "cpu", "PYTHON": sys.executable}
    env["SCRATCH"] = str(tmp_path / "scratch")
    cmd = ["bash", str(ROOT / "experiments" / "decisive.sh"), str(inputs), str(out), "300"]
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    dry = (out / "dry_run.md").read_text()
    assert "| tier 2 (every ordering, method, λ) | 8 |" in dry and "**total**" in dry
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["ran"] == 3 + 8  # training runs: tier 1, tier 2
    recs = list((out / "results" / "runs" / "tier2").glob("*.json"))
    assert len(recs) == 8  # 2 orderings x (none, ewc, kfc-expand, kfc)
    for path in recs:
        m = json.loads(path.read_text())["metrics"]
        assert all(len(v["test_ranks"]) == v["n_test"] == 6 for v in m.values())
    assert not (out / "results" / "models").exists()  # weights stay in the scratch folder
    assert len(list((out / "results" / "runs" / "state").glob("*.json"))) == 2
    report = (out / "report.md").read_text()
    assert "ewc − kfc-expand (primary)" in report and "seeds and queries" in report
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["ran"] == 0
    md = tmp_path / "results.md"
    assert _main(["report", str(inputs), str(out), "--md", str(md), "--smoke"]) == 0
    assert "kronlink-report:decisive:begin" in md.read_text()


def test_deadline_starts_no_run_that_would_not_fit(inputs: Path, tmp_path: Path) -> None:
    cfg = instantiate(inputs, tmp_path / "out", smoke=True, device="cpu")
    assert [p.runs for p in plan(cfg)] == [3, 2, 8]
    res = run_experiment(cfg, max_seconds=60, guess_seconds={"tier1": 61})
    assert res.ran == 0 and not res.complete
    assert not (tmp_path / "out" / "results" / "runs").exists()
