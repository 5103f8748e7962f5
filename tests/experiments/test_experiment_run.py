"""``kronlink experiment`` and ``kronlink report`` end to end on tiny tasks
and a tiny CNN: every tier runs, a second invocation runs nothing, a changed
setting reruns what it touches, pruned weights are rebuilt, the report keeps
the rest of the page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from experiment_helpers import TINY_CONFIG, tiny_config

from kronlink.cli import main
from kronlink.errors import ConfigError
from kronlink.experiments import collect_results, load_config, parse_config, run_experiment
from kronlink.experiments.store import RunStore, spec_id


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("exp")
    path = tiny_config(tmp)
    assert main(["experiment", str(path)]) == 0
    return path, {"tmp": tmp}


@pytest.fixture
def own_copy(done, tmp_path: Path) -> Path:
    """The finished experiment's results copied for one test that changes them:
    no test depends on what another one did to the shared run."""
    path, info = done
    shutil.copytree(info["tmp"] / "results", tmp_path / "results")
    copy = tmp_path / "tiny.toml"
    copy.write_text(
        TINY_CONFIG.format(results=tmp_path / "results", tasks=info["tmp"] / "tasks", epochs=1),
        encoding="utf-8",
    )
    assert load_config(copy).results_dir != load_config(path).results_dir
    return copy


def _count(store: RunStore, kind: str) -> int:
    return len(list(store.records(kind)))


def test_every_tier_is_stored(done) -> None:
    path, _ = done
    cfg = load_config(path)
    store = RunStore(cfg.results_dir)
    # 3 tasks: tier 1 per task; tier 2: 6 orderings x (none + 3 methods x 2 λ);
    # tier 3: 2 orderings x (none + kfc x 2 λ, A's λ carried); early: none, lrc,
    # replay and 3 penalties x 2 λ, from its own tier-1 model.
    assert _count(store, "tier1") == 3
    assert _count(store, "combined") == 1
    assert _count(store, "tier2") == 6 * (1 + 3 * 2)
    assert _count(store, "tier3") == 2 * (1 + 2)
    assert _count(store, "early") == 3 + 3 * 2
    assert _count(store, "early_single") == 1
    assert _count(store, "figure2") == 1
    assert _count(store, "layers") == 6 * 4  # Ω by layer of each tier-2 cell's run
    res = collect_results(cfg)
    assert res.complete and not res.missing
    for key, search in res.tier3_search.items():
        lam_a = res.tier2[(*key[:3], key[3][:2], key[4])]["spec"]["lambdas"][0]
        assert all(lam[0] == lam_a for lam in search.lambdas)  # carried from tier 2
        assert [lam[1] for lam in search.lambdas] == [0.1, 10.0]
    for rec in store.records("tier2"):
        assert rec["id"] == spec_id(rec["spec"])  # stored under its spec's hash
        assert set(rec["metrics"]) == {rec["spec"]["task"]["name"], rec["spec"]["seen"][0]["name"]}
        for m in rec["metrics"].values():  # per-query ranks for the endpoint's bootstrap
            assert len(m["test_ranks"]) == m["n_test"]
            assert sum(r == 1 for r in m["test_ranks"]) / m["n_test"] == m["test"]
            assert m["test_nll"] > 0
    # tier 2 kept only the weights tier 3 starts from (chosen by either rule, and none).
    kept = {p.stem for p in (store.root / "models").glob("*.safetensors")}
    grid_ids = {r["id"] for s in res.tier2_search.values() for r in s.rows}
    chosen = {s.chosen["id"] for s in res.tier2_search.values()} | {
        s.chosen_data_free["id"] for s in res.tier2_search.values()
    }
    assert kept & grid_ids == chosen


def test_second_run_runs_nothing_and_a_change_reruns(own_copy, capsys) -> None:
    path = own_copy
    capsys.readouterr()
    assert main(["experiment", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ran"] == 0 and summary["complete"]
    # One more epoch changes every training run's spec: tier 1 reruns.
    text = path.read_text().replace("epochs = 1, batch_size = 8", "epochs = 2, batch_size = 8")
    changed = path.with_name("changed.toml")
    changed.write_text(text)
    res = run_experiment(load_config(changed), tiers=["tier1"])
    assert res.ran == 3


def test_pruned_parent_weights_are_rebuilt(own_copy) -> None:
    path = own_copy
    cfg = load_config(path)
    store = RunStore(cfg.results_dir)
    res = collect_results(cfg)
    key = next(iter(res.tier3_search))
    stage2 = res.tier2[(*key[:3], key[3][:2], key[4])]
    before = store.load_weights(stage2["id"])
    store.drop_weights(stage2["id"])
    for rec in res.tier3_search[key].rows:
        store.record_path("tier3", rec["id"]).unlink()
    again = run_experiment(cfg, tiers=["tier3"])
    assert again.ran == 1 + len(res.tier3_search[key].rows)  # the parent, then its children
    after = store.load_weights(stage2["id"])
    # Seeded training on the CPU: the rebuilt parent is the same model.
    assert all((before[k] - after[k]).abs().max() == 0 for k in before)


def test_report_writes_its_section_and_keeps_the_page(done) -> None:
    path, info = done
    out = info["tmp"] / "results.md"
    out.write_text("# Results\n\nKept text.\n")
    img = info["tmp"] / "img"
    assert main(["report", str(path), "--out", str(out), "--img", str(img)]) == 0
    text = out.read_text()
    assert text.startswith("# Results\n\nKept text.\n")
    assert text.count("<!-- kronlink-report:tiny:begin -->") == 1
    for heading in ("Tier 1", "Tier 2", "Tier 3", "Early comparison", "Figure 2", "Wall time"):
        assert heading in text
    assert "| alpha → beta | kfc |" in text
    assert "Pre-registered endpoint" in text and "ewc − kfc (primary)" in text
    assert "seeds and queries" in text  # the records hold per-query ranks
    pngs = sorted(p.name for p in img.glob("*.png"))
    assert pngs == [
        "tiny-figure2.png",
        "tiny-front-cnn.png",
        "tiny-matrix-cnn.png",
        "tiny-percdelta-cnn.png",
    ]
    assert main(["report", str(path), "--out", str(out), "--img", str(img)]) == 0
    assert out.read_text() == text  # same runs, same section, written in place


def test_config_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"name": "x", "rankers": {"cnn": {"kind": "cnn", "epochs": 3}}})
    with pytest.raises(ConfigError, match="must include 'none'"):
        parse_config(
            {"name": "x", "rankers": {"c": {"kind": "cnn"}}, "tier2": {"methods": ["kfc"]}}
        )
    with pytest.raises(ConfigError, match="ordering"):
        parse_config(
            {"name": "x", "rankers": {"c": {"kind": "cnn"}}, "early": {"ordering": ["hpo", "x"]}}
        )
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_tier_names_match_the_config(capsys) -> None:
    from kronlink.cli.experiment import _TIER_NAMES
    from kronlink.experiments.config import TIERS

    assert (*TIERS, "figure2") == _TIER_NAMES
    config = Path(__file__).parents[2] / "experiments" / "cpu_small.toml"
    assert main(["experiment", str(config), "--only", "tier9"]) == 2
    assert "unknown tier" in capsys.readouterr().err
