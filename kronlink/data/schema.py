"""The records of a task: concepts of an ontology and queries that link into it.

Formats (DESIGN.md section 2), one JSON object a line:

- ontology.jsonl: ``{"id", "name", "synonyms": [..], "definition"}``
- queries.jsonl: ``{"mention", "left_context", "right_context",
  "candidates": [{"id", "name"}], "gold", "split"}``; ``candidates`` may be
  omitted (BM25 generates them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True, slots=True)
class Concept:
    id: str
    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Query:
    mention: str
    gold: str | None
    left_context: str = ""
    right_context: str = ""
    candidates: tuple[Candidate, ...] | None = None
    split: str | None = None

    def gold_index(self) -> int:
        """Position of the gold concept among the candidates, -1 if absent."""
        if self.candidates is None or self.gold is None:
            return -1
        for i, c in enumerate(self.candidates):
            if c.id == self.gold:
                return i
        return -1


@dataclass(frozen=True)
class Task:
    """One ontology dataset: its name, concepts and queries (with splits)."""

    name: str
    concepts: tuple[Concept, ...]
    queries: tuple[Query, ...]
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Query]:
        return [q for q in self.queries if q.split == name]
