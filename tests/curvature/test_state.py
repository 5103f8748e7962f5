"""Saving and loading curvature and task states (safetensors, checksum)."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from cv_models import MiniCrossEncoder, cross_batch

from kronlink.curvature import CurvatureState, TaskState, estimate_curvature
from kronlink.errors import CheckpointError
from kronlink.penalties import build_penalty

BF16 = 2**-7  # bf16 keeps 8 significant bits: relative rounding <= 2^-8 per entry


@pytest.fixture(scope="module")
def task() -> tuple[MiniCrossEncoder, TaskState]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = MiniCrossEncoder().float()
    batches = [cross_batch(5, 4, 6, 11, g)]
    batches = [
        type(b)(
            {k: v.float() if v.is_floating_point() else v for k, v in b.features.items()},
            b.candidate_mask,
            b.labels,
        )
        for b in batches
    ]
    state = estimate_curvature(model, batches)
    return model, TaskState.from_model(model, state, {"task": "hpo", "n_train": 5})


def _tensors(cs: CurvatureState) -> dict[str, torch.Tensor]:
    return cs.tensors(torch.float32)


def test_fp32_round_trip_is_exact(tmp_path, task) -> None:
    model, ts = task
    ts.curvature.save(tmp_path / "c.safetensors")
    back = CurvatureState.load(tmp_path / "c.safetensors", model=model)
    a, b = _tensors(ts.curvature), _tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.n_examples == ts.curvature.n_examples and back.layers == ts.curvature.layers
    ts.save(tmp_path / "t.safetensors")
    tb = TaskState.load(tmp_path / "t.safetensors", model=model)
    assert tb.stats == {"task": "hpo", "n_train": 5}
    assert all(torch.equal(tb.anchor[k], ts.anchor[k]) for k in ts.anchor)
    assert build_penalty("kfc", [tb], 1.0).per_task(model) == [0.0]


def test_bf16_round_trip_within_bf16_rounding(tmp_path, task) -> None:
    _, ts = task
    ts.save(tmp_path / "t.safetensors", dtype=torch.bfloat16)
    back = TaskState.load(tmp_path / "t.safetensors")
    a, b = _tensors(ts.curvature), _tensors(back.curvature)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= BF16 * a[k].abs().max(), k
    assert all(torch.equal(back.anchor[k], ts.anchor[k]) for k in ts.anchor)  # anchors exact
    assert (tmp_path / "t.safetensors").stat().st_size > 0


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def test_tampered_payload_fails_checksum(tmp_path, task) -> None:
    _, ts = task
    path = tmp_path / "t.safetensors"
    ts.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # flip one bit of the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        TaskState.load(path)


def test_missing_or_misshapen_tensor_and_model_mismatch(tmp_path, task) -> None:
    _, ts = task
    cs = ts.curvature
    # a file whose header declares other shapes than its tensors
    meta = cs.metadata()
    layers = json.loads(meta["layers"])
    layers[0]["weight_shape"][0] += 1
    from kronlink.curvature import _io

    _io.write(
        tmp_path / "bad.safetensors",
        cs.tensors(),
        {**meta, "layers": json.dumps(layers), "kind": "curvature"},
    )
    with pytest.raises(CheckpointError, match="shape"):
        CurvatureState.load(tmp_path / "bad.safetensors")
    # a missing tensor
    tensors = cs.tensors()
    tensors.pop(next(k for k in tensors if k.startswith("kfac/")))
    _io.write(tmp_path / "miss.safetensors", tensors, {**meta, "kind": "curvature"})
    with pytest.raises(CheckpointError, match="missing"):
        CurvatureState.load(tmp_path / "miss.safetensors")
    # a model of another shape
    cs.save(tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        CurvatureState.load(tmp_path / "ok.safetensors", model=MiniCrossEncoder(vocab=13))
    # wrong kind, not a file
    with pytest.raises(CheckpointError, match=r"kind|'task'"):
        TaskState.load(tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError):
        CurvatureState.load(tmp_path / "nope.safetensors")


def test_small_issues_warn(tmp_path, task) -> None:
    model, ts = task
    from kronlink.curvature import _io

    tensors = ts.curvature.tensors()
    tensors["extra/thing"] = torch.zeros(2)
    _io.write(tmp_path / "x.safetensors", tensors, {**ts.curvature.metadata(), "kind": "curvature"})
    with pytest.warns(UserWarning, match="unknown tensor"):
        CurvatureState.load(tmp_path / "x.safetensors")
    bigger = MiniCrossEncoder()
    bigger.extra = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="not be penalised"):
        ts.curvature.validate(bigger)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.curvature.validate(model)


def test_memory_is_linear_in_parameters(task) -> None:
    model, ts = task
    n_params = sum(p.numel() for p in model.parameters())
    per_layer = sum(
        info.a_dim**2 + info.g_dim**2 for info in ts.curvature.layers.values() if info.kronecker
    )
    # kfac + split: 3 (p̄² + q²) a layer; ekfac: p̄² + q² + q·p̄; the exact
    # blocks are (q·p̄)² with q·p̄ <= exact_max_params (1024): at most 1024
    # numbers per parameter they cover, a constant.
    exact = ts.curvature.exact
    assert exact, "the head (5 parameters) gets an exact block"
    exact_numbers = sum(f.numel() for f in exact.values())
    assert exact_numbers <= 1024 * sum(f.shape[0] for f in exact.values())
    assert ts.curvature.num_stored() - exact_numbers <= 3 * n_params + 4 * per_layer
