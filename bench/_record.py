"""What every clinical/retrieval bench stores beside its numbers: the load
average before and after (the machine is shared), and the record as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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


def record_main(
    doc: str,
    measure: Callable[[], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    argv: list[str] | None = None,
) -> None:
    """The command line of a bench that stores one record and prints its
    table: ``bench RECORD`` measures (``measure()`` gives the record's
    numbers, the load averages are added) and writes it; ``bench --table
    RECORD`` re-prints a stored one."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("--table", action="store_true", help="re-print the stored record's table")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.record.read_text())))
        return
    record: dict[str, Any] = {"loadavg_before": loadavg()}
    record.update(measure())
    write_record(args.record, record)
    print(table(record))
