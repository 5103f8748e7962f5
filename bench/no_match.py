"""P(top-1 right) on real tasks: fitted on dev, measured on test (issue 12, item 4).

    python bench/no_match.py measure results/nomatch/cnn_4000.json \\
        --run icd10cm=TASKS/icd10cm:MODEL_DIR --run hpo=TASKS/hpo:MODEL_DIR
    python bench/no_match.py report results/nomatch/cnn_4000.json \\
        --png docs/img/nomatch_reliability.png

``measure`` ranks every dev and test query of each task with its model and
the serving exact-name prior (``DEFAULT_EXACT_MARGIN``), end to end: the
candidates are the task's, and a query whose gold is not among them counts as
wrong. It fits the calibrator on dev exactly as the update job does
(:func:`kronlink.calibration.fit_calibrator`) and stores, for the test split,
ECE (10 equal-width bins) and binary NLL before (the softmax's top
probability) and after, the reliability bins of both, and precision/coverage
per ``no_match_below`` threshold. ``report`` prints the docs' tables and
draws the reliability chart from the record. Not a timing: no lock needed
(loadavg is recorded all the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7, 0.9)


def _run(text: str) -> tuple[str, Path, Path]:
    name, _, rest = text.partition("=")
    task, _, model = rest.partition(":")
    if not (name and task and model):
        raise SystemExit(f"expected NAME=TASK_DIR:MODEL_DIR, got {text!r}")
    return name, Path(task), Path(model)


def measure(out: Path, runs: list[tuple[str, Path, Path]], made_by: list[str]) -> None:
    from kronlink.calibration import (
        Calibrator,
        binary_nll,
        expected_calibration_error,
        fit_calibrator,
        precision_coverage,
        reliability,
    )
    from kronlink.data.io import load_task
    from kronlink.evaluation import score_queries
    from kronlink.models import load_ranker
    from kronlink.settings import DEFAULT_EXACT_MARGIN

    record: dict = {"loadavg_before": os.getloadavg(), "exact_margin": DEFAULT_EXACT_MARGIN}
    record["made_by"] = made_by  # how the tasks and models were made
    record["tasks"] = {}
    for name, task_dir, model_dir in runs:
        task = load_task(task_dir)
        model = load_ranker(model_dir)
        data = {}
        for split in ("dev", "test"):
            qs = task.split(split)
            scored = score_queries(model, qs, exact_margin=DEFAULT_EXACT_MARGIN)
            rows = [[s for _, s, _ in c] for c in scored]
            right = [
                bool(c) and max(c, key=lambda x: x[1])[0] == q.gold
                for q, c in zip(qs, scored, strict=True)
            ]
            present = sum(
                any(cid == q.gold for cid, _, _ in c) for q, c in zip(qs, scored, strict=True)
            )
            data[split] = (rows, right, present / len(qs))
        cal = fit_calibrator(data["dev"][0], data["dev"][1])
        rows, right, present = data["test"]
        raw = Calibrator("identity").many(rows)
        fitted = cal.many(rows)
        record["tasks"][name] = {
            "task": str(task_dir),
            "model": str(model_dir),
            "calibrator": cal.as_dict(),
            "dev": {
                "n": len(data["dev"][1]),
                "top1": sum(data["dev"][1]) / len(data["dev"][1]),
                "gold_among_candidates": data["dev"][2],
            },
            "test": {
                "n": len(right),
                "top1": sum(right) / len(right),
                "gold_among_candidates": present,
                "ece_bins": 10,
                "ece_binning": "equal-width",
                "ece_softmax": expected_calibration_error(raw, right),
                "ece_calibrated": expected_calibration_error(fitted, right),
                "nll_softmax": binary_nll(raw, right),
                "nll_calibrated": binary_nll(fitted, right),
                "reliability_softmax": reliability(raw, right),
                "reliability_calibrated": reliability(fitted, right),
                "precision_coverage": precision_coverage(fitted, right, THRESHOLDS),
            },
        }
        print(
            f"{name}: {cal.kind} {cal.params}; test ECE "
            f"{record['tasks'][name]['test']['ece_softmax']:.3f} -> "
            f"{record['tasks'][name]['test']['ece_calibrated']:.3f}"
        )
    record["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


def report(path: Path, png: Path | None) -> None:
    rec = json.loads(path.read_text())
    tasks = rec["tasks"]
    print(
        f"From {path} (loadavg {rec['loadavg_before'][0]:.2f} / {rec['loadavg_after'][0]:.2f}).\n"
    )
    print(
        "| task | dev n | test n | gold among candidates (test) | test top-1 | calibrator "
        "| test ECE, softmax | test ECE, calibrated | test NLL, softmax | test NLL, calibrated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, t in tasks.items():
        c, te = t["calibrator"], t["test"]
        params = ", ".join(f"{k}={v:.3g}" for k, v in c["params"].items())
        print(
            f"| {name} | {t['dev']['n']} | {te['n']} | {te['gold_among_candidates']:.3f} "
            f"| {te['top1']:.3f} | {c['kind']} ({params}) | {te['ece_softmax']:.3f} "
            f"| {te['ece_calibrated']:.3f} | {te['nll_softmax']:.3f} | {te['nll_calibrated']:.3f} |"
        )
    print(
        "\nPrecision/coverage on test (answer only where the calibrated confidence >= "
        "`no_match_below`;\nprecision is 1.000 by definition when nothing is answered):\n"
    )
    names = list(tasks)
    print("| no_match_below | " + " | ".join(f"{n} coverage | {n} precision" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    rows = zip(*(tasks[n]["test"]["precision_coverage"] for n in names), strict=True)
    for group in rows:
        cells = " | ".join(f"{r['coverage']:.3f} | {r['precision']:.3f}" for r in group)
        print(f"| {group[0]['threshold']:.2f} | {cells} |")
    if png is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.6), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        te = tasks[n]["test"]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
        for key, label, mark in (
            ("softmax", "softmax top-1 probability", "o"),
            ("calibrated", "calibrated (fitted on dev)", "s"),
        ):
            bins = [b for b in te[f"reliability_{key}"] if b["count"]]
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                marker=mark,
                label=f"{label}, ECE {te[f'ece_{key}']:.3f}",
            )
            for b in bins:  # a bin of 1 query is one coin: show how many each holds
                ax.annotate(
                    str(b["count"]),
                    (b["confidence"], b["accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
        ax.set_title(f"{n}: test, n={te['n']}")
        ax.set_xlabel("confidence (mean per equal-width bin; numbers: queries in the bin)")
        ax.set_ylabel("top-1 right (share)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"\nwrote {png}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("out", type=Path)
    m.add_argument("--run", action="append", type=_run, required=True)
    m.add_argument("--made-by", action="append", default=[], help="a command, kept in the record")
    r = sub.add_parser("report")
    r.add_argument("record", type=Path)
    r.add_argument("--png", type=Path)
    a = p.parse_args()
    if a.cmd == "measure":
        measure(a.out, a.run, a.made_by)
    else:
        report(a.record, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
