"""The concept-names file that users bring alongside a corpus.

Tab-separated, UTF-8, one concept a line::

    CUI<TAB>preferred name[<TAB>synonym|synonym|...]

Blank lines and lines starting with ``#`` are skipped. The id column is the
id the corpus links to (a UMLS CUI for MedMentions, a MedDRA or SNOMED CT code
for MedNorm); a third column, when present, lists synonyms separated by ``|``.
"""

from __future__ import annotations

from pathlib import Path

from kronlink.data._lines import text_lines
from kronlink.data.io import DEFAULT_MAX_BYTES
from kronlink.data.schema import Concept
from kronlink.errors import DataFormatError

__all__ = ["read_concept_names"]


def read_concept_names(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Concept]:
    path = Path(path)
    concepts: list[Concept] = []
    first_line: dict[str, int] = {}
    for lineno, line in text_lines(path, max_bytes):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if not 2 <= len(cols) <= 3:
            raise DataFormatError(
                f"expected 2 or 3 tab-separated columns (id, name[, synonyms]), got {len(cols)}",
                path=path,
                line=lineno,
            )
        cid, name = cols[0].strip(), cols[1].strip()
        if not cid:
            raise DataFormatError(
                "expected a concept id, got an empty column", path=path, line=lineno, field="id"
            )
        if not name:
            raise DataFormatError(
                "expected a name, got an empty column", path=path, line=lineno, field="name"
            )
        if cid in first_line:
            raise DataFormatError(
                f"duplicate concept id {cid!r}: first seen on line {first_line[cid]}",
                path=path,
                line=lineno,
                field="id",
            )
        first_line[cid] = lineno
        synonyms = (
            tuple(s.strip() for s in cols[2].split("|") if s.strip()) if len(cols) == 3 else ()
        )
        concepts.append(Concept(id=cid, name=name, synonyms=synonyms))
    if not concepts:
        raise DataFormatError("empty ontology: expected at least one concept, got none", path=path)
    return concepts
