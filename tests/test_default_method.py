"""Every door into an update (library, job contract, HTTP form, CLI) penalises
with the same default method, the one docs/curvature.md names as the winner
of the forgetting front (issue 13)."""

from __future__ import annotations

from pathlib import Path

from kronlink.cli import build_parser
from kronlink.contract import UpdateJobSpec
from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod
from kronlink.update import UpdateRequest
from service.routes.jobs import JobForm

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_one_default_method_everywhere() -> None:
    assert DEFAULT_METHOD in set(PenaltyMethod)
    assert UpdateRequest().method == DEFAULT_METHOD.value
    assert UpdateJobSpec(task_name="t", staged_id="0" * 32).method == DEFAULT_METHOD
    assert JobForm(task="t").method == DEFAULT_METHOD
    parser = build_parser()
    update = ["update", "--model", "m", "--task", "t", "--out", "o", "--state-out", "s"]
    for argv in (update, ["submit", "x", "--task", "t"]):
        assert parser.parse_args(argv).method == DEFAULT_METHOD.value, argv
    assert f"default `{DEFAULT_METHOD.value}`" in (DOCS / "service.md").read_text()
    assert f"default is `{DEFAULT_METHOD.value}`" in (DOCS / "curvature.md").read_text()
