"""``kronlink omega-calibration``: fit predicted forgetting (½Ω) against the
forgetting the stored research runs measured, store the fit under
results/curvature/ and write its table into docs/curvature.md; nothing is trained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from kronlink.experiments.omega_calibration import write_calibration

    record = write_calibration(args.record, args.md, from_record=args.from_record)
    groups = record["groups"]
    print(
        json.dumps(
            {
                "record": str(args.record),
                "md": str(args.md),
                "pairs": len(record["pairs"]),
                "groups": len(groups),
                "calibrated": sum(g["calibrated"] for g in groups),
            }
        )
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kronlink.experiments.omega_calibration import DEFAULT_RECORD

    r = sub.add_parser(
        "omega-calibration",
        help="fit predicted forgetting against measured forgetting in the stored research runs",
        description="Spearman's ρ with a bootstrap interval and the ratio measured / forecast "
        "per (config, ranker, method, rule); the verdict by the rule in "
        "kronlink/experiments/omega_calibration.py. Other sections of the markdown are kept.",
    )
    r.add_argument(
        "--record", type=Path, default=DEFAULT_RECORD, help="JSON record (default: %(default)s)"
    )
    r.add_argument(
        "--md", type=Path, default=Path("docs/curvature.md"), help="markdown (default: %(default)s)"
    )
    r.add_argument(
        "--from-record",
        action="store_true",
        help="rebuild the table from the stored record instead of refitting the run records",
    )
    r.set_defaults(func=run)
