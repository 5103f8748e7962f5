"""Reports land in docs/ and are read on other machines: a path inside the
checkout is shown relative to it, one outside as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronlink.experiments.report_tables import _shown


def test_paths_in_the_checkout_are_shown_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkout = tmp_path / "checkout"
    (checkout / "results" / "x").mkdir(parents=True)
    monkeypatch.chdir(checkout)
    assert _shown(str(checkout / "results" / "x")) == "results/x"
    assert _shown(checkout / "experiments" / "a.toml") == "experiments/a.toml"
    outside = str(tmp_path / "elsewhere" / "enc")
    assert _shown(outside) == outside
    assert _shown("relative/stays") == "relative/stays"
    assert _shown(3) == 3 and _shown(None) is None
