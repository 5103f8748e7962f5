"""Byte-reproducible safetensors files.

safetensors (0.8.0, upstream issue safetensors#584) writes ``__metadata__``
from a Rust ``HashMap`` in a random order per save, so two saves of the same
tensors and metadata differ in their header bytes and in their sha256. The
registry keys artifacts by sha256 and the tests check that a seeded training
run is reproducible, so after writing we rewrite the header in place with the
metadata keys sorted. Only key order changes, so the header keeps its length
and the tensor offsets stay valid.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def canonicalize_header(path: str | Path) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        # Same compact form as serde_json, so the length cannot change.
        out = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) > n:  # a different escaping than serde's; leave the file valid
            return
        f.seek(8)
        f.write(out + b" " * (n - len(out)))
