"""The artifact store: atomic puts, checksums on load, local folder and fsspec memory://."""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest

from kronlink.errors import CheckpointError, ConfigError
from kronlink.registry import ArtifactStore, ConflictError, version_key
from kronlink.registry import artifacts as artifacts_mod


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(tmp_path / "store")
    return ArtifactStore(f"memory://kronlink-test-{uuid.uuid4().hex}")


def make_dir(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "config.json").write_text('{"hidden": 8}')
    (src / "sub" / "factors.bin").write_bytes(b"abc")
    return src


def test_put_dir_then_get_verifies(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path)
    key = version_key("main", 1)
    info = store.put_dir(key, src)
    assert info.bytes == 2000 + 13 + 3 and len(info.sha256) == 64
    assert store.exists(key) and store.key_of(info.uri) == key
    out = store.get(key, info.sha256, dest=tmp_path / "down")
    assert (out / "sub" / "factors.bin").read_bytes() == b"abc"
    # Same content again is idempotent; other content under the key is refused.
    assert store.put_dir(key, src) == info
    (src / "config.json").write_text('{"hidden": 9}')
    with pytest.raises(ConflictError, match="immutable"):
        store.put_dir(key, src)


def test_put_file_and_checksum_mismatch(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "state.bin"
    src.write_bytes(b"curvature")
    info = store.put_file("states/main/1/hpo", src)
    assert info.sha256 == hashlib.sha256(b"curvature").hexdigest()
    assert store.read_bytes("states/main/1/hpo", info.sha256) == b"curvature"
    with pytest.raises(CheckpointError, match=r"checksum mismatch, expected sha256 0+, got"):
        store.read_bytes("states/main/1/hpo", "0" * 64)
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        store.verify("states/main/1/none", info.sha256)


def test_corrupted_dir_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    info = store.put_dir("versions/main/1", make_dir(tmp_path))
    (tmp_path / "store" / "versions/main/1/sub/factors.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        store.get("versions/main/1", info.sha256)


def test_failure_mid_write_leaves_nothing_visible(store: ArtifactStore, tmp_path: Path) -> None:
    """A mock raises after the first file, standing in for a full disk or a lost
    connection mid-write (faults this test cannot cause for real)."""
    src = make_dir(tmp_path)
    real = artifacts_mod._copy_hashing
    calls = {"n": 0}

    def failing(src_f, dst_f):
        calls["n"] += 1
        if calls["n"] == 2:
            dst_f.write(b"partial")
            raise OSError(28, "No space left on device (simulated)")
        return real(src_f, dst_f)

    with (
        mock.patch.object(artifacts_mod, "_copy_hashing", failing),
        pytest.raises(OSError, match="simulated"),
    ):
        store.put_dir("versions/main/2", src)
    assert not store.exists("versions/main/2")
    with pytest.raises(CheckpointError):
        store.get("versions/main/2", "0" * 64, dest=tmp_path / "d")
    # The temporary copy was cleaned up and a retry succeeds.
    if store._local is not None:
        assert not any((store._local / ".tmp").iterdir())
    info = store.put_dir("versions/main/2", src)
    assert store.verify("versions/main/2", info.sha256) == info


def test_failure_during_publish_leaves_nothing_visible(tmp_path: Path) -> None:
    """A mock os.replace that raises stands in for a crash at the rename."""
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    with (
        mock.patch.object(artifacts_mod.os, "replace", side_effect=OSError("simulated crash")),
        pytest.raises(OSError, match="simulated crash"),
    ):
        store.put_file("versions/main/3", src)
    assert not store.exists("versions/main/3")
    assert not any((tmp_path / "store" / ".tmp").iterdir())


def test_keys_are_checked(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    for bad in ("../escape", "/abs", ".tmp/x", "a/./b", "a//b", ""):
        with pytest.raises(ConfigError, match="artifact key"):
            store.put_file(bad, src)


def test_children_lists_published_names_only(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    assert store.children("versions") == []
    for key in ("versions/main/j1-a1", "versions/main/j2-a1", "versions/other/j3-a1"):
        store.put_file(key, src)
    assert store.children("versions") == ["main", "other"]
    assert store.children("versions/main") == ["j1-a1", "j2-a1"]
    store.delete("versions/main/j1-a1")
    assert store.children("versions/main") == ["j2-a1"]


def test_sweep_temporary_keeps_a_put_in_flight_and_removes_an_old_one(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """Issue 16 item 8: on fsspec stores the sweep removed the whole .tmp folder,
    another worker's put in flight included."""
    src = make_dir(tmp_path)
    # a put in flight: its temporary copy is written, its final key not yet
    tmp = store._tmp_name()
    if store._local is None:
        store._fs.put(str(src), tmp, recursive=True)
        exists = lambda: store._fs.exists(f"{tmp}/weights.bin")  # noqa: E731
    else:
        shutil.copytree(src, tmp)
        exists = lambda: Path(tmp, "weights.bin").exists()  # noqa: E731
    assert store.sweep_temporary() == 0  # an hour by default: a fresh put stays
    assert store.sweep_temporary(older_than_s=60) == 0
    assert exists()
    # two hours later the same leftover is debris of a put that died
    assert store.sweep_temporary(now=time.time() + 7200) == 1
    assert not exists()
