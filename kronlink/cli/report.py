"""``kronlink report CONFIG``: write the config's section of docs/results.md
(tables and PNG charts) from its stored runs; nothing is trained."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from kronlink.experiments import collect_results, load_config, render_report, write_section

    cfg = load_config(args.config)
    res = collect_results(cfg)
    out = Path(args.out)
    img = Path(args.img)
    rel = os.path.relpath(img, out.parent)
    body = render_report(res, img_dir=None if args.no_charts else img, img_rel=rel)
    write_section(out, cfg.name, body)
    print(
        json.dumps(
            {
                "out": str(out),
                "section": cfg.name,
                "complete": res.complete,
                "missing": len(res.missing),
            }
        )
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="write an experiment's section of docs/results.md from its stored runs",
        description="Tables in the paper's layout, forgetting reduction beside the paper's "
        "figures, λ chosen, seeds and spread, wall time, PNG charts. Other sections of the "
        "file are kept.",
    )
    r.add_argument("config", help="the TOML file the runs were made with")
    r.add_argument("--out", default="docs/results.md", help="markdown file (default: %(default)s)")
    r.add_argument("--img", default="docs/img", help="folder for the PNGs (default: %(default)s)")
    r.add_argument("--no-charts", action="store_true", help="tables only")
    r.set_defaults(func=run)
