"""The command line end to end on a real task: build-tasks -> train -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kronlink.cli import main
from kronlink.data.io import load_task


@pytest.fixture(scope="module")
def icd_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    assert (
        main(
            [
                "build-tasks",
                "--out",
                str(out),
                "--tasks",
                "icd10cm",
                "--limit",
                "900",
                "--candidates",
                "10",
            ]
        )
        == 0
    )
    return out / "icd10cm"


def _evaluate(model: Path, task: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--task",
                str(task),
                "--split",
                "test",
                "--json",
                *extra,
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_build_tasks_writes_the_format(icd_task: Path) -> None:
    task = load_task(icd_task)
    assert {p.name for p in icd_task.iterdir()} >= {"ontology.jsonl", "queries.jsonl", "task.json"}
    splits = {q.split for q in task.queries}
    assert splits == {"train", "dev", "test"}
    assert all(len(q.candidates or ()) == 10 for q in task.split("train"))
    assert all(q.gold_index() >= 0 for q in task.split("train"))  # gold inserted for training


def test_train_then_evaluate_learns(
    icd_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = tmp_path / "cnn"
    # An untrained model of the same kind, saved as the control.
    assert (
        main(
            [
                "train",
                "--task",
                str(icd_task),
                "--model",
                "cnn",
                "--out",
                str(tmp_path / "u"),
                "--epochs",
                "1",
                "--lr",
                "1e-12",
                "--limit",
                "16",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--task",
                str(icd_task),
                "--model",
                "cnn",
                "--out",
                str(model_dir),
                "--epochs",
                "6",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    record = json.loads((model_dir / "train.json").read_text())
    assert record["result"]["best_dev"]["n"] > 0
    trained = _evaluate(model_dir, icd_task, capsys, "--baseline")
    untrained = _evaluate(tmp_path / "u", icd_task, capsys)
    n_test = len(load_task(icd_task).split("test"))
    assert trained["n"] == untrained["n"] == n_test
    assert 0 <= trained["mrr"] <= 1 and 0 <= trained["accuracy"] <= trained["mrr"] + 1e-12
    assert trained["accuracy"] > untrained["accuracy"] + 0.05
    assert trained["mrr"] > untrained["mrr"] + 0.05
    # BM25 ranks the same test queries; beating it takes the transformer and
    # more steps than a unit test affords (make demo, docs/results.md).
    assert 0 < trained["bm25"]["accuracy"] <= trained["bm25"]["recall"]["10"] <= 1


def test_bad_input_is_a_clear_error(icd_task: Path, tmp_path: Path, capsys) -> None:
    assert main(["build-tasks", "--out", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ontology.jsonl").write_text('{"id": "A", "name": "a", "synonyms": []}\n')
    (broken / "queries.jsonl").write_text('{"mention": "x", "gold": "A", "split": "train"\n')
    (broken / "task.json").write_text('{"name": "broken", "format_version": 1}')
    assert (
        main(
            [
                "train",
                "--task",
                str(broken),
                "--model",
                "cnn",
                "--tiny",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "queries.jsonl" in err and "line 1" in err
    assert not (tmp_path / "m").exists()


def test_training_is_reproducible_with_a_seed(icd_task: Path, tmp_path: Path) -> None:
    def run(out: str, seed: str) -> bytes:
        assert (
            main(
                [
                    "train",
                    "--task",
                    str(icd_task),
                    "--model",
                    "cnn",
                    "--tiny",
                    "--out",
                    str(tmp_path / out),
                    "--limit",
                    "32",
                    "--epochs",
                    "1",
                    "--seed",
                    seed,
                ]
            )
            == 0
        )
        return (tmp_path / out / "model.safetensors").read_bytes()

    assert run("a", "1") == run("b", "1")
    assert run("c", "2") != run("a", "1")


@pytest.mark.parametrize("command", ["demo", "serve", "up"])
@pytest.mark.parametrize("port", ["81610", "0", "http"])
def test_a_port_out_of_range_is_refused_before_anything_starts(
    command: str, port: str, tmp_path: Path, capsys
) -> None:
    # "kronlink demo --port 81610" ended in an OverflowError traceback from bind()
    args = [command, "--port", port]
    if command == "demo":
        args += ["--dir", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and ("1 to 65535" in err or "port number" in err)
    assert not (tmp_path / "d").exists()
