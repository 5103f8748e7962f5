"""The artifact store: model weights, configs and curvature states, written atomically.

An artifact is a file or a directory under a key (``versions/main/3``). A put
writes everything under a temporary name beside the final one
(``<root>/.tmp/<uuid>``), hashes it, and then makes it visible in one step:

- local folder (the default): ``os.replace`` of the directory or file, one
  atomic rename on one filesystem. A reader sees the whole artifact or nothing.
- any other fsspec URL (``memory://``, ``s3://``...): the files are moved one
  by one (on object stores a move is a copy and a delete), then a completion
  marker is written last. A reader may see some files under the final key
  before the marker exists; :meth:`ArtifactStore.get` refuses a directory
  without its marker and re-checks the checksum, and the registry row that
  names the artifact and its sha256 is committed only after the put returns.

A directory's sha256 is the sha256 of its manifest: one line per file,
sorted by relative path, ``<path>\\0<bytes>\\0<file sha256>\\n``. The marker
holds that sha256 and then one ``<file sha256> <bytes> <path>`` line per
file, so a checksum mismatch names the files that changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kronlink.errors import CheckpointError, ConfigError
from kronlink.registry.errors import ConflictError
from kronlink.registry.records import ArtifactInfo

__all__ = ["ArtifactStore", "task_state_key", "version_key"]

MARKER = ".kronlink-complete"  # last file of a directory artifact: its sha256, manifest
_TMP = ".tmp"
_CHUNK = 1 << 20


def version_key(lineage: str, number: int) -> str:
    """Where a version's weights and config go: ``versions/<lineage>/<number>``."""
    return f"versions/{lineage}/{number}"


def task_state_key(lineage: str, number: int, task: str) -> str:
    """Where a task's curvature state goes: ``states/<lineage>/<number>/<task>``."""
    return f"states/{lineage}/{number}/{task}"


def _mtime(info: dict[str, Any]) -> float | None:
    """A file's modification time from an fsspec ``info`` dict, in epoch seconds
    (backends name and type it differently: float, datetime or ISO text)."""
    from datetime import datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ConfigError(
            f"artifact key: expected a relative path of names not starting with '.', got {key!r}"
        )
    return key


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream and return the sha256 and byte count of what went through."""
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _hash_stream(src: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _manifest_digest(entries: list[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for rel, size, digest in sorted(entries):
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def _marker_text(digest: str, entries: list[tuple[str, int, str]]) -> str:
    """The marker: the digest, then ``<sha256> <bytes> <path>`` per file, so
    that a later mismatch can name the file that changed."""
    return digest + "\n" + "".join(f"{d} {n} {rel}\n" for rel, n, d in sorted(entries))


def _changed_files(marker: str, entries: list[tuple[str, int, str]]) -> list[str]:
    """Files whose content differs from the marker's manifest (empty for a
    marker written before manifests were recorded)."""
    recorded: dict[str, tuple[int, str]] = {}
    for line in marker.splitlines()[1:]:
        digest, size, rel = line.split(" ", 2)
        recorded[rel] = (int(size), digest)
    if not recorded:
        return []
    found = {rel: (size, digest) for rel, size, digest in entries}
    out = []
    for rel in sorted(recorded.keys() | found.keys()):
        want, got = recorded.get(rel), found.get(rel)
        if got is None:
            out.append(f"{rel} is missing")
        elif want is None:
            out.append(f"{rel} was not part of the artifact")
        elif want != got:
            out.append(
                f"{rel} has sha256 {got[1]} ({got[0]} bytes), written as {want[1]} ({want[0]} bytes)"
            )
    return out


def _local_files(source: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            yield path.relative_to(source).as_posix(), path


class ArtifactStore:
    """Artifacts under ``root``: a local folder (path or ``file://``) or any fsspec URL.

    ``fs`` may be passed in (an fsspec filesystem) instead of being built from
    the URL, so tests can hand it a filesystem of their own.
    """

    def __init__(self, root: str | Path, *, fs: Any | None = None) -> None:
        root_s = str(root)
        if fs is None and ("://" not in root_s or root_s.startswith("file://")):
            self._local: Path | None = Path(root_s.removeprefix("file://")).resolve()
            self._local.mkdir(parents=True, exist_ok=True)
            self._fs = None
            self._root = str(self._local)
        else:
            import fsspec

            self._local = None
            if fs is None:
                fs, path = fsspec.core.url_to_fs(root_s)
            else:
                path = fs._strip_protocol(root_s)
            self._fs = fs
            self._root = path.rstrip("/")
        self.root_url = root_s

    # -- naming -------------------------------------------------------------
    def uri(self, key: str) -> str:
        """The URI a registry row records for ``key``."""
        key = _check_key(key)
        if self._local is not None:
            return (self._local / key).as_uri()
        return self._fs.unstrip_protocol(f"{self._root}/{key}")

    def key_of(self, uri: str) -> str:
        """The key of a URI this store produced."""
        prefix = self.uri("x")[:-1]
        if not uri.startswith(prefix):
            raise ConfigError(f"artifact URI: expected one under {prefix!r}, got {uri!r}")
        return _check_key(uri[len(prefix) :])

    def _path(self, key: str) -> str:
        return f"{self._root}/{_check_key(key)}"

    def exists(self, key: str) -> bool:
        """True when a complete artifact is visible under ``key``."""
        if self._local is not None:
            return (self._local / _check_key(key)).exists()
        path = self._path(key)
        if self._fs.isdir(path):
            return self._fs.exists(f"{path}/{MARKER}")
        return self._fs.exists(path)

    # -- writing ------------------------------------------------------------
    def _tmp_name(self) -> str:
        return f"{self._root}/{_TMP}/{uuid.uuid4().hex}"

    def put_file(self, key: str, source: str | Path) -> ArtifactInfo:
        """Store one file under ``key``; visible only once complete."""
        key = _check_key(key)
        source = Path(source)
        if not source.is_file():
            raise ConfigError(f"put_file: expected a file, got {source}")
        tmp = self._tmp_name()
        try:
            if self._local is not None:
                Path(tmp).parent.mkdir(parents=True, exist_ok=True)
                with source.open("rb") as src, open(tmp, "wb") as dst:
                    digest, size = _copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            else:
                with source.open("rb") as src, self._fs.open(tmp, "wb") as dst:
                    digest, size = _copy_hashing(src, dst)
            return self._publish(key, tmp, ArtifactInfo(self.uri(key), digest, size))
        finally:
            self._remove_tmp(tmp)

    def put_dir(self, key: str, source: str | Path) -> ArtifactInfo:
        """Store a directory tree under ``key``; visible only once complete."""
        key = _check_key(key)
        source = Path(source)
        if not source.is_dir():
            raise ConfigError(f"put_dir: expected a directory, got {source}")
        tmp = self._tmp_name()
        entries: list[tuple[str, int, str]] = []
        try:
            for rel, path in _local_files(source):
                if rel == MARKER:
                    raise ConfigError(f"put_dir: {source} contains the reserved name {MARKER}")
                with path.open("rb") as src, self._open_write(f"{tmp}/{rel}") as dst:
                    digest, size = _copy_hashing(src, dst)
                entries.append((rel, size, digest))
            digest = _manifest_digest(entries)
            total = sum(size for _, size, _ in entries)
            info = ArtifactInfo(self.uri(key), digest, total)
            marker = _marker_text(digest, entries)
            if self._local is not None:
                Path(tmp).mkdir(parents=True, exist_ok=True)
                (Path(tmp) / MARKER).write_text(marker)
                _fsync_tree(Path(tmp))
            return self._publish(key, tmp, info, rels=[rel for rel, _, _ in entries], marker=marker)
        finally:
            self._remove_tmp(tmp)

    def _open_write(self, path: str) -> Any:
        if self._local is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return open(path, "wb")
        return self._fs.open(path, "wb")

    def _publish(
        self,
        key: str,
        tmp: str,
        info: ArtifactInfo,
        rels: list[str] | None = None,
        marker: str | None = None,
    ) -> ArtifactInfo:
        """The one step that makes a finished temporary artifact visible."""
        final = self._path(key)
        if self.exists(key):
            return self._same_or_conflict(key, info)
        if self._local is not None:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, final)  # atomic on one filesystem
            except OSError:
                if not self.exists(key):
                    raise
                return self._same_or_conflict(key, info)  # a concurrent put won the race
            _fsync_dir(Path(final).parent)
            return info
        if rels is None:
            self._fs.mv(tmp, final)
        else:
            for rel in rels:
                self._fs.mv(f"{tmp}/{rel}", f"{final}/{rel}")
            with self._fs.open(f"{final}/{MARKER}", "wb") as f:
                f.write((marker or info.sha256).encode())
        return info

    def _same_or_conflict(self, key: str, info: ArtifactInfo) -> ArtifactInfo:
        try:
            return self.verify(key, info.sha256)
        except CheckpointError as exc:
            raise ConflictError(
                f"artifact {key!r} already exists with other content (artifacts are immutable)"
            ) from exc

    def _remove_tmp(self, tmp: str) -> None:
        if self._local is not None:
            p = Path(tmp)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink(missing_ok=True)
        elif self._fs.exists(tmp):
            self._fs.rm(tmp, recursive=True)

    def sweep_temporary(self, older_than_s: float = 3600.0, *, now: float | None = None) -> int:
        """Delete temporary leftovers of puts that died: entries of the ``.tmp``
        folder whose newest file is older than ``older_than_s`` (another
        worker's put in flight is younger). Returns the count."""
        cutoff = (time.time() if now is None else now) - older_than_s
        if self._local is None:
            return self._sweep_remote_temporary(cutoff)
        tmp_root = self._local / _TMP
        if not tmp_root.is_dir():
            return 0
        removed = 0
        for p in tmp_root.iterdir():
            if p.stat().st_mtime < cutoff:
                self._remove_tmp(str(p))
                removed += 1
        return removed

    def _sweep_remote_temporary(self, cutoff: float) -> int:
        root = f"{self._root}/{_TMP}"
        if not self._fs.exists(root):
            return 0
        removed = 0
        for entry in self._fs.ls(root, detail=False):
            found = self._fs.find(entry, detail=True, withdirs=True)
            times = [t for info in [self._fs.info(entry), *found.values()] if (t := _mtime(info))]
            # No timestamp from this backend: keep it (a put in flight looks the same).
            if times and max(times) < cutoff:
                self._fs.rm(entry, recursive=True)
                removed += 1
        return removed

    # -- reading ------------------------------------------------------------
    def verify(self, key: str, expected_sha256: str) -> ArtifactInfo:
        """Re-hash the artifact under ``key``; raise CheckpointError unless it matches."""
        key = _check_key(key)
        path = self._path(key)
        is_dir = Path(path).is_dir() if self._local is not None else self._fs.isdir(path)
        if not self.exists(key):
            raise CheckpointError(f"artifact {key!r}: missing or incomplete at {self.uri(key)}")
        if is_dir:
            entries = []
            for rel in self._list_dir(path):
                with self._open_read(f"{path}/{rel}") as f:
                    digest, size = _hash_stream(f)
                entries.append((rel, size, digest))
            got, total = _manifest_digest(entries), sum(s for _, s, _ in entries)
        else:
            with self._open_read(path) as f:
                got, total = _hash_stream(f)
        if got != expected_sha256:
            changed = []
            if is_dir:
                try:
                    with self._open_read(f"{path}/{MARKER}") as f:
                        changed = _changed_files(f.read().decode("utf-8", "replace"), entries)
                except (OSError, ValueError):  # no marker, or a damaged one: no names then
                    changed = []
            raise CheckpointError(
                f"artifact {key!r}: checksum mismatch, expected sha256 {expected_sha256}, got {got}"
                + (f" ({'; '.join(changed)})" if changed else "")
            )
        return ArtifactInfo(self.uri(key), got, total)

    def _open_read(self, path: str) -> Any:
        return open(path, "rb") if self._local is not None else self._fs.open(path, "rb")

    def _list_dir(self, path: str) -> list[str]:
        if self._local is not None:
            return [rel for rel, _ in _local_files(Path(path)) if rel != MARKER]
        rels = [p[len(path) + 1 :] for p in self._fs.find(path)]
        return sorted(r for r in rels if r != MARKER)

    def read_bytes(self, key: str, expected_sha256: str) -> bytes:
        """A file artifact's content, checked against ``expected_sha256``."""
        key = _check_key(key)
        if not self.exists(key):
            raise CheckpointError(f"artifact {key!r}: missing or incomplete at {self.uri(key)}")
        with self._open_read(self._path(key)) as f:
            data = f.read()
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise CheckpointError(
                f"artifact {key!r}: checksum mismatch, expected sha256 {expected_sha256}, got {got}"
            )
        return data

    def get(self, key: str, expected_sha256: str, dest: str | Path | None = None) -> Path:
        """A verified local path to the artifact.

        Local store: the artifact's own path (checked in place). fsspec store:
        a copy downloaded into ``dest`` (required), then checked.
        """
        key = _check_key(key)
        if self._local is not None:
            self.verify(key, expected_sha256)
            return self._local / key
        if dest is None:
            raise ConfigError("get: a remote store needs dest, a local folder to download into")
        self.verify(key, expected_sha256)
        dest = Path(dest)
        path = self._path(key)
        if self._fs.isdir(path):
            for rel in self._list_dir(path):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                self._fs.get_file(f"{path}/{rel}", str(dest / rel))
            # re-check the downloaded copy: the remote could change between reads
            entries = []
            for rel, p in _local_files(dest):
                with p.open("rb") as f:
                    digest, size = _hash_stream(f)
                entries.append((rel, size, digest))
            got = _manifest_digest(entries)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._fs.get_file(path, str(dest))
            with dest.open("rb") as f:
                got, _ = _hash_stream(f)
        if got != expected_sha256:
            raise CheckpointError(
                f"artifact {key!r}: downloaded copy has sha256 {got}, expected {expected_sha256}"
            )
        return dest

    def children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (hidden ones excluded); [] when absent."""
        path = self._path(prefix)
        if self._local is not None:
            p = Path(path)
            names = [c.name for c in p.iterdir()] if p.is_dir() else []
        elif self._fs.isdir(path):
            names = [c.rstrip("/").rsplit("/", 1)[-1] for c in self._fs.ls(path, detail=False)]
        else:
            names = []
        return sorted(n for n in names if not n.startswith("."))

    def delete(self, key: str) -> None:
        """Remove an artifact (a failed version's, say). Missing keys are fine."""
        path = self._path(key)
        if self._local is not None:
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        elif self._fs.exists(path):
            self._fs.rm(path, recursive=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
