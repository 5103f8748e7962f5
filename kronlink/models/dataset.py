"""Queries tokenised once, batched from tensors (issue 14, item 1).

``model.encode`` tokenises a batch's texts on every call; a training run used
to call it every step of every epoch, and evaluation, the curvature pass and
the next run did it all again. ``encoded_queries(model, queries)`` tokenises
each query once per (ranker kind, vocabulary, encoding settings, query list)
and keeps per-query tensors trimmed to the query's own width; ``batch``
pads a set of them back to exactly what ``model.encode`` gives for the same
queries (tested element by element), so training, evaluation and curvature
see the same tensors either way.

A process-wide cache, keyed by content, lets later runs, the dev evaluation
and the curvature pass of the same split reuse the tensors. Ids are stored as
int32 and masks as uint8 (a fifth of the int64 bytes) and cast back when a
batch is built.

``length_buckets`` orders a shuffled epoch so that each batch holds queries of
similar width (less padding), keeping the batches' order random.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kronlink.data.schema import Query
from kronlink.models.base import Ranker, RankerBatch

__all__ = [
    "EncodedQueries",
    "FeaturePadding",
    "clear_cache",
    "collate",
    "encoded_queries",
    "length_buckets",
]

# Queries tokenised per ``model.encode`` call while building; bounds the
# padded intermediate (the widest query sets every row's width).
_CHUNK = 256
# Cached encodings kept per process (train, dev, test of a few tasks).
_CACHE_SIZE = 16


@dataclass(frozen=True)
class FeaturePadding:
    """How ``model.encode`` pads one feature.

    ``group``: features of one group share their token width in a batch.
    ``pad``: the value of padded token positions. ``empty_row``: the leading
    values of a padded candidate slot (the rest is ``pad``); None when the
    feature has no candidate dimension (one row per query).
    """

    group: str
    pad: int
    empty_row: tuple[int, ...] | None


def _compact(t: Tensor) -> Tensor:
    if t.dtype in (torch.bool, torch.uint8):
        return t.to(torch.uint8)
    if t.dtype == torch.long and t.numel() and int(t.min()) >= -(2**31) and int(t.max()) < 2**31:
        return t.to(torch.int32)
    return t


class EncodedQueries:
    """Per-query tensors of one ranker's encoding; ``batch(indices)`` equals
    ``model.encode([queries[i] for i in indices])`` (``meta`` included)."""

    def __init__(
        self,
        padding: dict[str, FeaturePadding],
        dtypes: dict[str, torch.dtype],
        items: list[dict[str, Tensor]],
        widths: list[dict[str, int]],
        n_candidates: list[int],
        labels: list[int],
        candidate_ids: list[list[str]],
    ) -> None:
        self.padding = padding
        self.dtypes = dtypes
        self.items = items
        self.widths = widths
        self.n_candidates = n_candidates
        self.labels = labels
        self.candidate_ids = candidate_ids

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(cls, model: Ranker, queries: Sequence[Query]) -> EncodedQueries:
        padding = model.batch_padding()
        out = cls(padding, {}, [], [], [], [], [])
        for start in range(0, len(queries), _CHUNK):
            chunk = list(queries[start : start + _CHUNK])
            batch = model.encode(chunk)
            out.dtypes = {k: v.dtype for k, v in batch.features.items()}
            for i in range(len(chunk)):
                n_c = int(batch.candidate_mask[i].sum())
                item: dict[str, Tensor] = {}
                width: dict[str, int] = {}
                for key, spec in padding.items():
                    t = batch.features[key][i]
                    if spec.empty_row is not None:
                        t = t[:n_c]
                    real = (t != spec.pad).reshape(-1, t.shape[-1]).any(dim=0).nonzero()
                    w = int(real[-1]) + 1 if len(real) else 0
                    width[spec.group] = max(width.get(spec.group, 0), w)
                    item[key] = t
                for key, spec in padding.items():
                    t = item[key][..., : width[spec.group]]
                    item[key] = _compact(t.clone())
                out.items.append(item)
                out.widths.append(width)
                out.n_candidates.append(n_c)
                out.labels.append(int(batch.labels[i]))
                out.candidate_ids.append(list(batch.meta["candidate_ids"][i]))
        return out

    def batch(self, indices: Sequence[int]) -> RankerBatch:
        return collate([(self, i) for i in indices])

    def width(self, index: int) -> int:
        """The query's widest token group: what padding costs follow."""
        return max(self.widths[index].values(), default=0)


def collate(picks: Sequence[tuple[EncodedQueries, int]]) -> RankerBatch:
    """One batch from (dataset, index) pairs of datasets of one ranker
    encoding (training batches mix replayed queries in)."""
    if not picks:
        raise ValueError("collate needs at least one query")
    first = picks[0][0]
    padding, dtypes = first.padding, first.dtypes
    n_batch = len(picks)
    n_cand = max([1, *(ds.n_candidates[i] for ds, i in picks)])
    short = any(ds.n_candidates[i] < n_cand for ds, i in picks)
    widths: dict[str, int] = {}
    for spec in padding.values():
        w = max(ds.widths[i][spec.group] for ds, i in picks)
        if short and spec.empty_row is not None:
            w = max(w, len(spec.empty_row))
        widths[spec.group] = max(widths.get(spec.group, 0), w)
    features: dict[str, Tensor] = {}
    for key, spec in padding.items():
        w = widths[spec.group]
        if spec.empty_row is None:
            out = torch.full((n_batch, w), spec.pad, dtype=dtypes[key])
            for b, (ds, i) in enumerate(picks):
                t = ds.items[i][key]
                out[b, : t.shape[-1]] = t
        else:
            out = torch.full((n_batch, n_cand, w), spec.pad, dtype=dtypes[key])
            row = torch.tensor(spec.empty_row, dtype=dtypes[key])
            for b, (ds, i) in enumerate(picks):
                t = ds.items[i][key]
                out[b, : t.shape[0], : t.shape[-1]] = t
                if t.shape[0] < n_cand:
                    out[b, t.shape[0] :, : len(row)] = row
        features[key] = out
    mask = torch.zeros((n_batch, n_cand), dtype=torch.bool)
    for b, (ds, i) in enumerate(picks):
        mask[b, : ds.n_candidates[i]] = True
    labels = torch.tensor([ds.labels[i] for ds, i in picks], dtype=torch.long)
    meta = {"candidate_ids": [list(ds.candidate_ids[i]) for ds, i in picks]}
    return RankerBatch(features, mask, labels, meta)


def _queries_key(queries: Sequence[Query]) -> str:
    h = hashlib.sha256()
    for q in queries:
        cands = q.candidates
        parts = [q.mention, q.left_context, q.right_context, str(q.gold)]
        if cands is None:
            parts.append("\x00none")
        else:
            for c in cands:
                parts += [c.id, c.name]
        h.update("\x1f".join(parts).encode("utf-8", "surrogatepass") + b"\x1e")
    return f"{len(queries)}:{h.hexdigest()}"


_cache: OrderedDict[tuple[str, str], EncodedQueries] = OrderedDict()


def clear_cache() -> None:
    _cache.clear()


def encoded_queries(model: Ranker, queries: Sequence[Query]) -> EncodedQueries | None:
    """The queries tokenised by ``model``, from the cache when the same
    encoding of the same queries was built before; None when the ranker does
    not describe its padding (``batch_padding``), so callers fall back to
    ``model.encode`` per batch."""
    try:
        enc_key = model.encoding_key()
    except NotImplementedError:
        return None
    key = (enc_key, _queries_key(queries))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    data = EncodedQueries.build(model, queries)
    _cache[key] = data
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return data


def length_buckets(
    order: Sequence[int], data: EncodedQueries, batch_size: int, rng: random.Random, span: int = 50
) -> list[list[int]]:
    """``order`` (already shuffled) cut into batches of similar width: each
    window of ``span`` batches is sorted by width and cut, then all batches
    are shuffled, so batches stay random while padding shrinks."""
    batches: list[list[int]] = []
    window = batch_size * span
    for s in range(0, len(order), window):
        part = sorted(order[s : s + window], key=data.width)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
