"""Deterministic train/dev/test splits and the mention filters of DESIGN.md section 2.

A query goes to a split by a stable hash of a key and the seed::

    u = int(sha256(f"{seed}\\x1f{key}").digest()[:8], big-endian) / 2**64
    split = "train" if u < f_train else "dev" if u < f_train + f_dev else "test"

The key is the gold id (``split_by_concept``: every mention of a concept lands
in the same split) or the gold id plus the normalised mention and its contexts
(``split_by_mention``). hashlib, not ``hash()``: Python salts ``hash`` per
process. Because each item is placed on its own, split sizes match the
fractions only approximately, and adding or removing data never moves the
other items between splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from kronlink.data._text import normalize
from kronlink.data.schema import SPLITS, Concept, Query

__all__ = [
    "DEFAULT_FRACTIONS",
    "FilterReport",
    "SplitRule",
    "assign_split",
    "filter_mentions",
    "split_by_concept",
    "split_by_mention",
    "split_queries",
    "train_synonyms",
    "with_synonyms",
    "without_query_strings",
]

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


class SplitRule(StrEnum):
    MENTION = "mention"  # the paper's setting: a test concept may have train mentions
    CONCEPT = "concept"  # no test concept is seen in training


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split ``key`` falls in for this seed (see the module docstring)."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions):
        raise ValueError(f"expected {len(SPLITS)} non-negative fractions, got {fractions}")
    total = sum(fractions)
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"expected fractions summing to 1, got {total}")
    u = _unit(key, seed)
    bound = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        bound += frac
        if u < bound:
            return name
    return SPLITS[-1]


def _mention_key(q: Query) -> str:
    return "\x1f".join((q.gold or "", normalize(q.mention), q.left_context, q.right_context))


def _by_key(
    queries: Iterable[Query], key: Callable[[Query], str], seed: int, fractions: Sequence[float]
) -> list[Query]:
    return [replace(q, split=assign_split(key(q), seed, fractions)) for q in queries]


def split_by_mention(
    queries: Iterable[Query],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    key: Callable[[Query], str] | None = None,
) -> list[Query]:
    """Place each query on its own; a concept's mentions may span splits.

    The default key is (gold, normalised mention, contexts), so identical
    queries share a split; pass ``key`` to group otherwise (e.g. by document).
    """
    return _by_key(queries, key or _mention_key, seed, fractions)


def split_by_concept(
    queries: Iterable[Query],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[Query]:
    """Place all mentions of a concept in one split: test concepts are unseen in train."""
    return _by_key(queries, lambda q: q.gold or "", seed, fractions)


def split_queries(
    queries: Iterable[Query],
    rule: SplitRule | str,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[Query]:
    """Dispatch on the rule's name ("mention" or "concept")."""
    match SplitRule(rule):
        case SplitRule.MENTION:
            return split_by_mention(queries, seed, fractions)
        case SplitRule.CONCEPT:
            return split_by_concept(queries, seed, fractions)


@dataclass
class FilterReport:
    """How many queries each filter dropped, by reason."""

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return {"kept": self.kept, **{f"dropped_{k}": v for k, v in sorted(self.dropped.items())}}


def filter_mentions(
    queries: Sequence[Query],
    concepts: Sequence[Concept],
    *,
    dedupe: bool = False,
) -> tuple[list[Query], FilterReport]:
    """Drop the mentions DESIGN.md section 2 excludes; keep the others in order.

    Compared after normalisation (case-folded, whitespace collapsed), a query
    is dropped when its gold is not a concept (``unknown_gold``), its mention
    equals its concept's name (``own_name``: nothing to learn), equals another
    concept's name (``other_name``: the label would contradict the ontology),
    or the same mention links to several concepts anywhere in ``queries``
    (``ambiguous``). With ``dedupe``, repeats of a (mention, gold) pair after
    the first are dropped too (``duplicate``): for synonym-derived tasks a
    repeat in another split would be the same example on both sides.
    """
    by_id = {c.id: c for c in concepts}
    name_owners: dict[str, set[str]] = defaultdict(set)
    for c in concepts:
        name_owners[normalize(c.name)].add(c.id)
    golds_of: dict[str, set[str]] = defaultdict(set)
    for q in queries:
        if q.gold in by_id:
            golds_of[normalize(q.mention)].add(q.gold)

    report = FilterReport()
    kept: list[Query] = []
    seen: set[tuple[str, str]] = set()
    for q in queries:
        m = normalize(q.mention)
        if q.gold not in by_id:
            reason = "unknown_gold"
        elif not m:
            reason = "empty"
        elif m == normalize(by_id[q.gold].name):
            reason = "own_name"
        elif name_owners.get(m, set()) - {q.gold}:
            reason = "other_name"
        elif len(golds_of[m]) > 1:
            reason = "ambiguous"
        elif dedupe and (m, q.gold) in seen:
            reason = "duplicate"
        else:
            seen.add((m, q.gold))
            kept.append(q)
            continue
        report.dropped[reason] += 1
    report.kept = len(kept)
    return kept, report


def train_synonyms(queries: Iterable[Query]) -> dict[str, list[str]]:
    """Per gold id, its distinct train mentions in first-seen order.

    These, and only these, may be searched by candidate generation and stored
    as ontology synonyms: a dev or test mention in the index would retrieve
    itself.
    """
    out: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for q in queries:
        if q.split != "train" or q.gold is None:
            continue
        key = (q.gold, normalize(q.mention))
        if key not in seen:
            seen.add(key)
            out[q.gold].append(q.mention)
    return dict(out)


def with_synonyms(
    concepts: Iterable[Concept], synonyms: Mapping[str, Sequence[str]]
) -> list[Concept]:
    """Copies of ``concepts`` whose synonyms are exactly ``synonyms[id]`` (or none)."""
    return [replace(c, synonyms=tuple(synonyms.get(c.id, ()))) for c in concepts]


def without_query_strings(concepts: Iterable[Concept], queries: Iterable[Query]) -> list[Concept]:
    """Copies of ``concepts`` holding none of the queries' mentions.

    What an ontology stores (and every index built from it searches) is the
    ontology's own content: names, and its synonyms and definitions minus
    every string used as a query in any split (issue 12, item 0). A synonym
    equal to a mention after normalisation is dropped; a definition is split
    at "; " (how the builders join notes) and parts equal to a mention are
    dropped. Names stay: the filter already drops queries equal to a name.
    What a task teaches lives in the weights, never in the stored ontology.
    """
    used = {normalize(q.mention) for q in queries}
    used.discard("")
    out: list[Concept] = []
    for c in concepts:
        synonyms = tuple(s for s in c.synonyms if normalize(s) not in used)
        definition = c.definition or ""
        if definition and any(normalize(p) in used for p in definition.split("; ")):
            definition = "; ".join(p for p in definition.split("; ") if normalize(p) not in used)
        if synonyms != c.synonyms or definition != (c.definition or ""):
            c = replace(c, synonyms=synonyms, definition=definition)
        out.append(c)
    return out
