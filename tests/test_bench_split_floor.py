"""docs/benchmarks.md's section on the CNN's conv group (issue 14 item 3) is
what its stored records re-print (bench/split_floor.py, bench/curvature.py
--from-json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import split_floor  # noqa: E402

DOCS = (REPO / "docs" / "benchmarks.md").read_text()


def _record(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def test_split_floor_table_reprints_from_its_record(capsys) -> None:
    path = "results/curvature/split_floor_cnn_2.json"
    split_floor.show(_record(path), path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 11 and lines[0].startswith(f"From {path}: CNN, 1 thread(s)")
    assert all(line in DOCS for line in lines)


def test_cnn_step_ratios_are_their_records() -> None:
    for name, want in (
        ("steps_cpu_cnnsplit_main15", "1.060x / 1.069x"),
        ("steps_cpu_cnnsplit_main31", "1.067x / 1.080x"),
        ("steps_cpu_cnnsplit_main31b", "1.059x / 1.073x"),
    ):
        rows = {r["penalty"]: r for r in _record(f"results/curvature/{name}.json")["steps"]}
        got = f"{rows['kfc-expand']['x_plain_paired']:.3f}x / {rows['kfc']['x_plain_paired']:.3f}x"
        assert got == want, name
        assert f"| `{name}.json` |" in DOCS and f"| {want} |" in DOCS
