"""The compose stack's wall times, as docs/operations.md shows them, from the
records the test writes (``KRONLINK_COMPOSE_TIMINGS=results/compose/<run>.json``).

    python tests/compose/timings_table.py results/compose/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("base image", "services image", "kronlink image", "stack up", "bootstrap job")
STAGES += ("stack down", "total")


def table(paths: list[Path]) -> str:
    rows = ["| run | " + " | ".join(STAGES) + " | load (1, 5, 15 min) |"]
    rows.append("|---|" + "---:|" * len(STAGES) + "---|")
    for p in paths:
        rec = json.loads(p.read_text())
        t = rec["timings_s"]
        load = ", ".join(f"{x:.1f}" for x in rec["loadavg"])
        cells = " | ".join(f"{t[s]:.0f}" if s in t else "" for s in STAGES)
        rows.append(f"| {p.stem.replace('_', ' ')} | {cells} | {load} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
