"""What every clinical/retrieval bench stores beside its numbers: the load
average before and after (the machine is shared), and the record as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg spells them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Add ``loadavg_after`` and write ``record`` to ``path`` (folders made)."""
    record["loadavg_after"] = loadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
