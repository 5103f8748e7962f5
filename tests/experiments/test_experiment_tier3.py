"""Tier 3's appendix-A λ procedure (``[tier3] search = "appendix_a"``): B's
λ searched ×/÷100 around the geometric mean of the λs tier 2 chose with B
as the old task, chosen on B's drop alone (checked by brute force on the
stored runs), A's λ carried from tier 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from experiment_helpers import TINY_CONFIG, write_tiny_tasks

from kronlink.errors import ConfigError
from kronlink.experiments import load_config, run_experiment


def _config(tmp: Path, search: str) -> Path:
    tasks = tmp / "tasks"
    write_tiny_tasks(tasks)
    text = TINY_CONFIG.format(results=tmp / "results", tasks=tasks, epochs=1)
    text = text.replace(
        'tiers = ["tier1", "combined", "tier2", "tier3", "early"]', 'tiers = ["tier1", "tier3"]'
    )
    text = text.replace('methods = ["none", "ewc", "kfc", "ekfac"]', 'methods = ["none", "kfc"]')
    text = text.replace(
        'orderings = [["alpha", "beta", "gamma"], ["gamma", "alpha", "beta"]]',
        f'orderings = [["alpha", "beta", "gamma"]]\nsearch = "{search}"',
    )
    text = text.split("[figure2]")[0]
    path = tmp / "tiny.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_appendix_a_searches_around_b_s_tier2_lambdas(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "appendix_a"))
    res = run_experiment(cfg)
    assert res.complete
    key = ("cnn", "mention", 0, ("alpha", "beta", "gamma"), "kfc")
    search = res.tier3_search[key]
    lam_b = [
        res.tier2[("cnn", "mention", 0, ("beta", x), "kfc")]["spec"]["lambdas"][0]
        for x in ("alpha", "gamma")
    ]
    centre = math.sqrt(lam_b[0] * lam_b[1])
    lam_a = res.tier2[("cnn", "mention", 0, ("alpha", "beta"), "kfc")]["spec"]["lambdas"][0]
    assert [lam[0] for lam in search.lambdas] == [lam_a] * 5
    assert [lam[1] for lam in search.lambdas] == pytest.approx(
        [centre * 10**k for k in range(-2, 3)]
    )
    # Brute force: among rows within the margin of the unpenalised run's gamma
    # dev accuracy, the least drop of beta's dev accuracy (ties: higher gamma, smaller λ).
    none = res.tier3[(*key[:4], "none")]
    stage2 = res.tier2[("cnn", "mention", 0, ("alpha", "beta"), "kfc")]
    ok = [
        r for r in search.rows
        if r["metrics"]["gamma"]["dev"] >= none["metrics"]["gamma"]["dev"] - cfg.selection.margin - 1e-9
    ]  # fmt: skip
    pool = ok or search.rows
    if ok:
        best = min(
            pool,
            key=lambda r: (
                stage2["metrics"]["beta"]["dev"] - r["metrics"]["beta"]["dev"],
                -r["metrics"]["gamma"]["dev"],
                tuple(r["spec"]["lambdas"]),
            ),
        )
    else:
        best = min(pool, key=lambda r: (-r["metrics"]["gamma"]["dev"], tuple(r["spec"]["lambdas"])))
    assert search.chosen["id"] == best["id"]


def test_unknown_tier3_search_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="appendix_a"):
        load_config(_config(tmp_path, "appendix"))
