"""Where an experiment keeps its runs: one JSON record per finished run,
named by the hash of the run's spec, plus the weights and task states later
runs start from.

    <results>/runs/<kind>/<id>.json      record: spec, id, metrics, timings
    <results>/models/<id>.safetensors    weights of a run other runs start from
    <results>/states/<id>.safetensors    curvature + anchor (TaskState) of that model
    <results>/tasks/<name>-<hash>/       built task folders (save_task)

A run's spec holds everything that determines its result, including its
parent's id, so the id changes whenever anything upstream changes, and a
record with the same id is the same run: it is never run again. Records are
written atomically (a sibling file, then a rename), so an interrupted
experiment leaves only whole records.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["RunStore", "spec_id"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_id(spec: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the spec's canonical JSON."""
    return hashlib.sha256(_canonical(spec).encode("utf-8")).hexdigest()[:16]


def _sibling_tmp(path: Path) -> Path:
    """A temp name of its own beside ``path``: two processes writing the same
    record (runs side by side, or a re-run racing a resumed one) must never
    share one, or one's rename publishes the other's half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _sibling_tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunStore:
    def __init__(self, root: str | Path, scratch: str | Path | None = None) -> None:
        self.root = Path(root)
        # Weights, states and built tasks: beside the records unless a config
        # keeps them elsewhere (a device command returns only what is small).
        self.scratch = Path(scratch) if scratch is not None else self.root

    # records ----------------------------------------------------------------

    def record_path(self, kind: str, run_id: str) -> Path:
        return self.root / "runs" / kind / f"{run_id}.json"

    def get(self, kind: str, spec: Mapping[str, Any]) -> dict | None:
        """The stored record of this exact spec, or None."""
        path = self.record_path(kind, spec_id(spec))
        if not path.exists():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        # A hash collision, or a record edited by hand: do not trust it.
        if _canonical(record.get("spec")) != _canonical(spec):
            return None
        return record

    def put(self, kind: str, spec: Mapping[str, Any], result: Mapping[str, Any]) -> dict:
        run_id = spec_id(spec)
        record = {"id": run_id, "kind": kind, "spec": spec, **result}
        _atomic_write_text(self.record_path(kind, run_id), json.dumps(record, indent=1))
        return record

    def records(self, kind: str) -> Iterator[dict]:
        folder = self.root / "runs" / kind
        for path in sorted(folder.glob("*.json")) if folder.exists() else ():
            yield json.loads(path.read_text(encoding="utf-8"))

    # weights and states -------------------------------------------------------

    def model_path(self, run_id: str) -> Path:
        return self.scratch / "models" / f"{run_id}.safetensors"

    def state_path(self, run_id: str) -> Path:
        return self.scratch / "states" / f"{run_id}.safetensors"

    def save_weights(self, run_id: str, model: torch.nn.Module) -> None:
        path = self.model_path(run_id)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        tmp = _sibling_tmp(path)
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_weights(self, run_id: str) -> dict[str, torch.Tensor] | None:
        path = self.model_path(run_id)
        return load_file(str(path)) if path.exists() else None

    def drop_weights(self, run_id: str) -> None:
        """Delete a run's weights (its record stays): only runs that later
        runs start from need them, and a CNN's weights are tens of MB."""
        self.model_path(run_id).unlink(missing_ok=True)

    def task_dir(self, name: str, spec: Mapping[str, Any]) -> Path:
        return self.scratch / "tasks" / f"{name}-{spec_id(spec)}"
