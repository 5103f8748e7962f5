"""Batch plumbing shared by the rankers: candidate slots, masks, padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kronlink.data.schema import Candidate, Query
from kronlink.errors import DataFormatError


def candidates_of(queries: Sequence[Query]) -> list[tuple[Candidate, ...]]:
    """Each query's candidates; a query without any list is a caller error."""
    out = []
    for i, q in enumerate(queries):
        if q.candidates is None:
            raise DataFormatError(
                f"query {i} ({q.mention!r}) has no candidates; generate them (BM25) first",
                field="candidates",
            )
        out.append(q.candidates)
    return out


def num_slots(cands: Sequence[Sequence[Candidate]]) -> int:
    """Candidate slots C of a batch; at least 1 so shapes never have a 0."""
    return max([1, *(len(c) for c in cands)])


def candidate_mask(cands: Sequence[Sequence[Candidate]], n_cand: int) -> Tensor:
    """(B, C) bool, True for real candidates."""
    mask = torch.zeros((len(cands), n_cand), dtype=torch.bool)
    for b, cs in enumerate(cands):
        mask[b, : len(cs)] = True
    return mask


def gold_labels(queries: Sequence[Query]) -> Tensor:
    return torch.tensor([q.gold_index() for q in queries], dtype=torch.long)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id rows to the longest: (ids long, real-token mask bool)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask
