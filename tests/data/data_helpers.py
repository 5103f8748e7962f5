"""Factories shared by the data tests (a uniquely named module: a bare
``import conftest`` would clash with other test folders' conftest files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kronlink.data.schema import Concept, Query

FIXTURES = Path(__file__).parent / "fixtures"


def small_ontology() -> list[Concept]:
    return [
        Concept("C1", "Cystic fibrosis", ("Mucoviscidosis",)),
        Concept("C2", "Kidney failure", ("Renal failure",)),
        Concept("C3", "Acute kidney injury"),
        Concept("C4", "Hypertensive disease", ("High blood pressure",)),
        Concept("C5", "Type 2 diabetes mellitus"),
        Concept("C6", "Type 1 diabetes mellitus"),
        Concept("C7", "Lung disease", ("Pulmonary disease", "Disorder of lung")),
        Concept("C8", "Chronic kidney disease"),
        Concept("C9", "Pseudomonas aeruginosa infection"),
        Concept("C10", "Asthma"),
    ]


def synthetic_queries(n_concepts: int = 200, per_concept: int = 5) -> list[Query]:
    return [
        Query(mention=f"mention {c} variant {m}", gold=f"C{c}")
        for c in range(n_concepts)
        for m in range(per_concept)
    ]


def fingerprint(path: Path) -> tuple[bytes, int]:
    """Content hash and mtime: a reader must leave both as they were."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).digest(), st.st_mtime_ns
