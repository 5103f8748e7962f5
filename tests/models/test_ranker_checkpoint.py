"""A saved ranker is a self-contained folder that loads to the same scores;
broken folders raise CheckpointError with a message that says what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kronlink.errors import CheckpointError, ConfigError
from kronlink.models import build_ranker, load_ranker

SCORE_ATOL = 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_same_scores(kind: str, dtype, tiny, queries, tmp_path: Path) -> None:
    model = tiny(kind, dtype=dtype)
    with torch.no_grad():  # move off the init, so a fresh init cannot pass by chance
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "m")
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]

    loaded = load_ranker(tmp_path / "m")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert not loaded.training
    assert next(loaded.parameters()).dtype == dtype
    batch = model.encode(queries)
    assert all(
        torch.equal(v, loaded.encode(queries).features[k]) for k, v in batch.features.items()
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=SCORE_ATOL)


def test_config_json_records_kind_fields_and_version(kind: str, tiny, tmp_path: Path) -> None:
    model = tiny(kind)
    model.save(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["kind"] == kind
    assert payload["format_version"] == 1
    assert set(payload["config"]) == set(vars(model.config))


@pytest.fixture
def saved(kind: str, tiny, tmp_path: Path) -> Path:
    tiny(kind).save(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(folder: Path, edit) -> None:
    payload = json.loads((folder / "config.json").read_text())
    edit(payload)
    (folder / "config.json").write_text(json.dumps(payload))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))


def _wrong_width(folder: Path) -> None:
    """Declare a narrower model than the tensors hold."""

    def edit(payload: dict) -> None:
        if payload["kind"] == "transformer":
            payload["encoder_config"].update(hidden_size=16, intermediate_size=32)
        else:
            payload["config"]["channels"] = 8

    _edit_config(folder, edit)


def _flip_last_byte(folder: Path) -> None:
    """Corrupt tensor data, not the header: only the checksum can tell."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# breakage -> a word the message must contain
BREAKAGES = {
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    "missing config": (lambda f: (f / "config.json").unlink(), "config.json"),
    "missing tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
    "truncated weights": (_truncate, "model.safetensors"),
    "garbled header": (_garble_header, "model.safetensors"),
    "config not json": (lambda f: (f / "config.json").write_text("{oops"), "config.json"),
    "unknown kind": (lambda f: _edit_config(f, lambda p: p.update(kind="lstm")), "lstm"),
    "future format": (lambda f: _edit_config(f, lambda p: p.update(format_version=99)), "99"),
    "unknown option": (
        lambda f: _edit_config(f, lambda p: p["config"].update(colour="red")),
        "colour",
    ),
    "shape mismatch": (_wrong_width, "expected"),
    "flipped tensor byte": (_flip_last_byte, "checksum"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_checkpoint_raises(saved: Path, breakage: str) -> None:
    breaker, word = BREAKAGES[breakage]
    breaker(saved)
    with pytest.raises(CheckpointError, match=word):
        load_ranker(saved)


def test_loading_needs_no_package_folder(kind: str, tiny, queries, tmp_path: Path) -> None:
    """The folder alone is enough: move it and load from the new place."""
    model = tiny(kind)
    model.save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(
            load_ranker(tmp_path / "b")(model.encode(queries)), model(model.encode(queries))
        )


def test_build_rejects_unknown_kind_and_option() -> None:
    with pytest.raises(ConfigError, match="unknown ranker kind"):
        build_ranker("lstm")
    with pytest.raises(ConfigError, match="colour"):
        build_ranker("cnn", tokenizer=None, colour="red")
    with pytest.raises(ConfigError, match="kernel_size"):
        build_ranker("cnn", tokenizer=None, kernel_size=4)
