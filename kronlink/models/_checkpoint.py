"""The on-disk form of a ranker: one folder, readable with no package folder.

    config.json        {"format_version", "kind", "config": {...},
                        "weights_sha256", ...extra}
    model.safetensors  the state dict (safetensors, never pickle)
    tokenizer.json     the word-piece tokenizer

``save_model``/``load_model`` of safetensors handle tensors that share storage
(tied weights), which ``save_file`` refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from kronlink._safetensors import canonicalize_header
from kronlink.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

C = TypeVar("C")

_FLOAT_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """A config dataclass from JSON values; lists become tuples where the
    field is a tuple. Unknown names raise ConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} option(s) {unknown}; expected some of {sorted(names)}"
        )
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**fixed)


def write_checkpoint(
    model: nn.Module, directory: str | Path, *, kind: str, config: Any, extra: dict[str, Any]
) -> Path:
    """Write weights, then config.json last (atomically): a folder with a
    config.json is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(
        model,
        str(directory / WEIGHTS_FILE),
        metadata={"kind": kind, "format_version": str(FORMAT_VERSION)},
    )
    canonicalize_header(directory / WEIGHTS_FILE)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config_to_dict(config),
        "weights_sha256": _sha256(directory / WEIGHTS_FILE),
        **extra,
    }
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a saved ranker, checked for a known format version."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"expected {path}; it is missing (not a saved kronlink ranker?)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(payload, dict) or "kind" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: expected an object with 'kind' and 'config'")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: expected format_version {FORMAT_VERSION}, got {version!r}")
    return payload


def config_from_checkpoint(cls: type[C], payload: dict[str, Any], directory: Path) -> C:
    try:
        return config_from_dict(cls, payload["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad config: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(
    model: nn.Module, directory: Path, map_location: str | torch.device, payload: dict[str, Any]
) -> None:
    """Fill ``model`` from model.safetensors; checksum (when config.json has
    one), names and shapes must match."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"expected {path}; it is missing")
    # The header check below misses flipped bytes inside tensors; the checksum does not.
    expected_sha = payload.get("weights_sha256")
    if expected_sha is not None and _sha256(path) != expected_sha:
        raise CheckpointError(
            f"{path}: checksum mismatch (expected sha256 {expected_sha} from config.json): "
            "the file is corrupt or belongs to another save"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            found = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {s.get_dtype() for s in slices.values()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {exc}") from exc
    wrong = [
        f"{k}: expected {expected[k]}, got {shape}"
        for k, shape in found.items()
        if k in expected and expected[k] != shape
    ]
    if wrong:
        more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
        raise CheckpointError(f"{path}: shape mismatch: " + "; ".join(wrong[:4]) + more)
    device = torch.device(map_location)
    # A model saved in float64 (tests, curvature checks) comes back in float64.
    floats = dtypes & set(_FLOAT_DTYPES)
    if len(floats) == 1:
        model.to(_FLOAT_DTYPES[floats.pop()])
    model.to(device)
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {path}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
