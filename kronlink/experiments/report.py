"""``docs/results.md`` sections from stored runs: the paper's tables (accuracy
and Perc. Δ per task), forgetting reduction beside the paper's figures, the
λ chosen, seeds and spread, wall time, and PNG charts.

A config's section sits between two marker comments; writing it again
replaces only that section, so the rest of the page is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from kronlink.experiments.report_endpoint import endpoint_section
from kronlink.experiments.report_extra import _early, _figure2, _front, _layers, _wall
from kronlink.experiments.report_tables import (
    PAPER_FORGETTING_REDUCTION,
    _data_free,
    _reduction,
    _seq_table,
    _setup,
    _tier1,
    _View,
)
from kronlink.experiments.runner import Results

__all__ = ["PAPER_FORGETTING_REDUCTION", "render_report", "write_section"]


def render_report(res: Results, img_dir: Path | None = None, img_rel: str | None = None) -> str:
    """The markdown section for ``res`` (charts drawn into ``img_dir`` when given)."""
    v = _View(res)
    cfg = res.config
    charts: dict[str, str] = {}
    if img_dir is not None:
        from kronlink.experiments.charts import draw_all

        charts = draw_all(res, img_dir, img_rel or str(img_dir))
    lines = [f"## Experiments: `{cfg.name}`", ""]
    lines += _setup(res)
    if not res.complete:
        lines += [
            "",
            f"**Incomplete**: {len(res.missing)} run(s) of this config are not stored yet; tables show what is.",
        ]
    lines += ["", *_tier1(v), ""]
    if res.tier2:
        lines += ["### Tier 2: two tasks in every order (the paper's Table 3)", ""]
        lines += [
            "Test accuracy after training on B (A: the old task); Perc. Δ against the "
            "tier-1 model of the same task and seed; λ chosen on the dev splits by the "
            "paper's rule (docs/experiments.md).",
            "",
        ]
        lines += _seq_table(v, "tier2")
        lines += ["#### Forgetting reduction (tier 2)", "", *_reduction(v, "tier2"), ""]
        lines += ["#### The λ front (tier 2): every grid run, mean over orderings and seeds", ""]
        lines += [*_front(v), ""]
        lines += ["#### Grid λ (old dev data) against the data-free λ", "", *_data_free(v), ""]
        endpoint = endpoint_section(v)
        if endpoint:
            lines += ["#### Pre-registered endpoint: paired drop difference", "", *endpoint, ""]
        if res.layers:
            lines += ["#### Which layers the penalty weighs (tier 2)", "", *_layers(v), ""]
        for key in ("percdelta", "front"):
            for r in v.rankers:
                if f"{key}-{r.name}" in charts:
                    lines += [f"![{key} {r.name}]({charts[f'{key}-{r.name}']})", ""]
    if res.tier3:
        lines += ["### Tier 3: three tasks in every order (the paper's Table 4)", ""]
        lines += _seq_table(v, "tier3")
        lines += ["#### Forgetting reduction (tier 3)", "", *_reduction(v, "tier3"), ""]
        for r in v.rankers:
            if f"matrix-{r.name}" in charts:
                lines += [f"![accuracy matrix {r.name}]({charts[f'matrix-{r.name}']})", ""]
    if res.early:
        lines += ["### Early comparison (the paper's Table 1)", "", *_early(v), ""]
    fig = _figure2(res, charts.get("figure2"))
    if fig:
        lines += [*fig, ""]
    lines += ["### Wall time", "", *_wall(res), ""]
    return "\n".join(lines).rstrip() + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- kronlink-report:{name}:begin -->", f"<!-- kronlink-report:{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path`` (appended the first
    time); everything outside the markers is left as it was."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
