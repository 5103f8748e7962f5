"""safetensors files with a checksum of their tensor payload (no pickle).

The checksum is sha256 over the tensors in sorted name order, each as
``name, dtype, shape, raw bytes``; it is stored in the header's metadata and
verified on load, so a flipped byte in the payload is a ``CheckpointError``
rather than a silently wrong penalty.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kronlink._safetensors import canonicalize_header
from kronlink.errors import CheckpointError

FORMAT = "kronlink-curvature"
# 2 added the split factors and exact blocks (issue 13); 1 still loads.
FORMAT_VERSION = 2


def _dense(t: Tensor) -> Tensor:
    """A fresh CPU copy with unit strides (``contiguous()`` keeps odd strides
    on size-1 dimensions, which byte views reject)."""
    t = t.detach().to("cpu")
    return t.new_empty(t.shape).copy_(t)


def payload_sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = _dense(tensors[name])
        digest.update(name.encode())
        digest.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a reader never sees a half-written state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _dense(v) for k, v in tensors.items()}
    meta = {
        **metadata,
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sha256": payload_sha256(tensors),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        canonicalize_header(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read tensors and metadata; check format, version, kind and checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        version = -1
    if not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(this kronlink reads 1..{FORMAT_VERSION})"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: expected a {kind!r} file, got {meta.get('kind')!r}")
    expected = meta.get("sha256")
    got = payload_sha256(tensors)
    if expected != got:
        raise CheckpointError(
            f"{path}: tensor payload checksum mismatch (header says {expected}, "
            f"payload hashes to {got}); the file is corrupt or was modified"
        )
    return tensors, meta


def loads(meta: dict[str, str], key: str, path: str | Path) -> object:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing or malformed") from exc
