"""The research harness: the paper's protocol (tiers 1 to 3, the early
comparison, Figure 2) run from a TOML config over stored, resumable runs,
and the report written from them (docs/experiments.md).

    cfg = load_config("experiments/cpu_small.toml")
    results = run_experiment(cfg, max_seconds=540)   # trains what is not stored
    write_section(Path("docs/results.md"), cfg.name, render_report(collect_results(cfg)))
"""

from kronlink.experiments.config import ExperimentConfig, load_config, parse_config
from kronlink.experiments.driver import collect_results, run_experiment
from kronlink.experiments.metrics import (
    Choice,
    GridRow,
    forgetting_reduction,
    perc_delta,
    select_data_free,
    select_paper,
)
from kronlink.experiments.report import render_report, write_section
from kronlink.experiments.runner import Results, Search

__all__ = [
    "Choice",
    "ExperimentConfig",
    "GridRow",
    "Results",
    "Search",
    "collect_results",
    "forgetting_reduction",
    "load_config",
    "parse_config",
    "perc_delta",
    "render_report",
    "run_experiment",
    "select_data_free",
    "select_paper",
    "write_section",
]
