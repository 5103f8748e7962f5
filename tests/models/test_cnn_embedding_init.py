"""The CNN's Embedding started from the encoder's word-piece embeddings
(CNNRankerConfig.embedding_init = "encoder")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kronlink.errors import ConfigError
from kronlink.models._text import default_encoder_path
from kronlink.models.cnn import CNNRanker, CNNRankerConfig, encoder_embeddings


@pytest.mark.parametrize("dim", [1, 3, 8, 11])
def test_projection_is_the_principal_components(tmp_path, dim):
    rng = np.random.default_rng()
    w = rng.normal(size=(60, 8)) * rng.uniform(0.1, 3.0, size=8) + rng.normal(size=8)
    save_file(
        {"bert.embeddings.word_embeddings.weight": torch.tensor(w, dtype=torch.float32)},
        str(tmp_path / "model.safetensors"),
    )
    out = encoder_embeddings(tmp_path, dim, 60).numpy()
    # brute force: numpy's SVD of the centred matrix, scores U * S, largest first
    u, s, _ = np.linalg.svd(w - w.mean(0), full_matrices=False)
    k = min(dim, 8)
    ref = (u * s)[:, :k]
    ref = ref / ref.std(ddof=1)  # torch.std is the unbiased one
    assert out.shape == (60, dim)
    assert np.allclose(np.abs(out[:, :k]), np.abs(ref), atol=1e-4)  # columns up to sign
    assert np.all(out[:, k:] == 0)
    assert out[:, :k].std(ddof=1) == pytest.approx(1.0, abs=1e-5)


def test_vocabulary_mismatch_and_bad_settings_are_clear_errors(tmp_path):
    save_file(
        {"embeddings.word_embeddings.weight": torch.zeros(5, 4)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ConfigError, match="5 word-piece embeddings for a vocabulary of 6"):
        encoder_embeddings(tmp_path, 4, 6)
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        encoder_embeddings(tmp_path / "missing", 4, 5)
    with pytest.raises(ConfigError, match="embedding_init must be"):
        CNNRankerConfig(embedding_init="glove")
    with pytest.raises(ConfigError, match="needs a tokenizer folder"):
        CNNRankerConfig(tokenizer=None, embedding_init="encoder")


def _cos(e: torch.Tensor, ids: list[int]) -> float:
    a, b = e[ids[0]], e[ids[1]]
    return float(a @ b / (a.norm() * b.norm()))


def test_related_pieces_start_closer_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = CNNRanker.build(CNNRankerConfig(embedding_init="encoder"))
    vocab = {
        t: i
        for i, t in enumerate(
            (default_encoder_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
        )
    }
    e = model.embedding.weight.detach()
    pairs = [("heart", "cardiac"), ("kidney", "renal"), ("lung", "pulmonary"), ("cancer", "tumor")]
    unrelated = [
        ("heart", "guitar"),
        ("kidney", "election"),
        ("fever", "bicycle"),
        ("cancer", "poetry"),
    ]
    for (a, b), (c, d) in zip(pairs, unrelated, strict=True):
        assert _cos(e, [vocab[a], vocab[b]]) > _cos(e, [vocab[c], vocab[d]]) + 0.1, (a, b, c, d)
    random = CNNRanker.build(CNNRankerConfig()).embedding.weight.detach()
    related_random = np.mean([_cos(random, [vocab[a], vocab[b]]) for a, b in pairs])
    related_encoder = np.mean([_cos(e, [vocab[a], vocab[b]]) for a, b in pairs])
    assert related_encoder > related_random + 0.2
    model.save(tmp_path / "m")
    loaded = CNNRanker.load(tmp_path / "m")
    assert loaded.config.embedding_init == "encoder"
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)
