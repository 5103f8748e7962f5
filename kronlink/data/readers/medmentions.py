"""MedMentions in PubTator format, plus a concept-names file, to a Task.

PubTator, one document after another, separated by blank lines::

    PMID|t|Title text
    PMID|a|Abstract text
    PMID<TAB>start<TAB>end<TAB>mention<TAB>semantic types<TAB>CUI

Offsets are 0-based, end exclusive, into ``title + " " + abstract`` (how
MedMentions counts them); the mention must equal that slice. The CUI may carry
a ``UMLS:`` prefix. MedMentions ships no concept names (UMLS is licensed), so
the user supplies them: see :mod:`kronlink.data.readers._names`.

Context: up to ``context_words`` whitespace-separated words either side of
the mention, from the same document. Splits: by default by document (a hash
of the PMID, the same rule as ``split_by_mention`` with the PMID as key), or
by the official split files' PMIDs (``pmid_splits``), or by the mention or
concept rule of :mod:`kronlink.data.splits`.

The ontology is the names file as given: its synonyms are searched, and no
corpus mention is copied into it (the ontology outlives the job's data,
DESIGN.md section 1). A test mention may equal a train mention of another
document: that is the corpus's "seen mention" case, not leakage of the test
item, since the index holds names-file text only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kronlink.data._lines import text_lines
from kronlink.data.builders._assemble import assemble_task
from kronlink.data.io import DEFAULT_MAX_BYTES
from kronlink.data.readers._names import read_concept_names
from kronlink.data.schema import SPLITS, Query, Task
from kronlink.data.splits import DEFAULT_FRACTIONS, assign_split
from kronlink.errors import DataFormatError

__all__ = ["Annotation", "Document", "read_medmentions", "read_pubtator"]


# "PMID|t|title" or "PMID|a|abstract"; the text itself may contain "|".
_TEXT_LINE = re.compile(r"^([^\t|]+)\|([a-z])\|(.*)$")


@dataclass(frozen=True, slots=True)
class Annotation:
    start: int
    end: int
    mention: str
    semtypes: str
    cui: str
    line: int


@dataclass
class Document:
    pmid: str
    title: str = ""
    abstract: str = ""
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def text(self) -> str:
        return f"{self.title} {self.abstract}"


def _fail(msg: str, path: Path, line: int, field: str | None = None) -> DataFormatError:
    return DataFormatError(msg, path=path, line=line, field=field)


def read_pubtator(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Document]:
    """Parse and validate a PubTator file, one document at a time."""
    path = Path(path)
    doc: Document | None = None
    for lineno, line in text_lines(path, max_bytes):
        if not line.strip():
            if doc is not None:
                yield doc
                doc = None
            continue
        if m := _TEXT_LINE.match(line):
            pmid, kind, text = m.groups()
            if kind not in ("t", "a"):
                raise _fail(
                    f"expected 't' (title) or 'a' (abstract) after the PMID, got {kind!r}",
                    path,
                    lineno,
                    "kind",
                )
            if kind == "t":
                if doc is not None:
                    yield doc
                doc = Document(pmid=pmid, title=text)
            else:
                if doc is None or doc.pmid != pmid or doc.abstract or doc.annotations:
                    raise _fail(
                        f"expected the abstract of the current document right after its "
                        f"title, got one for PMID {pmid!r}",
                        path,
                        lineno,
                        "pmid",
                    )
                doc.abstract = text
            continue
        cols = line.split("\t")
        if len(cols) != 6:
            raise _fail(
                f"expected 6 tab-separated columns (pmid, start, end, mention, "
                f"semtypes, cui), got {len(cols)}",
                path,
                lineno,
            )
        pmid, start_s, end_s, mention, semtypes, cui = cols
        if doc is None or pmid != doc.pmid:
            current = doc.pmid if doc else None
            raise _fail(
                f"expected an annotation of the current document {current!r}, got PMID {pmid!r}",
                path,
                lineno,
                "pmid",
            )
        try:
            start, end = int(start_s), int(end_s)
        except ValueError:
            raise _fail(
                f"expected integer offsets, got {start_s!r} and {end_s!r}", path, lineno, "start"
            ) from None
        text = doc.text
        if not 0 <= start < end <= len(text):
            raise _fail(
                f"expected 0 <= start < end <= {len(text)}, got {start} and {end}",
                path,
                lineno,
                "end",
            )
        if text[start:end] != mention:
            raise _fail(
                f"expected the text at {start}:{end}, {text[start:end]!r}, got {mention!r}",
                path,
                lineno,
                "mention",
            )
        cui = cui.strip().removeprefix("UMLS:")
        if not cui:
            raise _fail("expected a concept id, got an empty column", path, lineno, "cui")
        doc.annotations.append(Annotation(start, end, mention, semtypes, cui, lineno))
    if doc is not None:
        yield doc


def _context(text: str, start: int, end: int, words: int) -> tuple[str, str]:
    if words <= 0:
        return "", ""
    left = text[:start].split()[-words:]
    right = text[end:].split()[:words]
    return " ".join(left), " ".join(right)


def read_medmentions(
    corpus_path: str | Path,
    names_path: str | Path,
    *,
    split_rule: str = "document",
    seed: int = 0,
    k: int = 25,
    context_words: int = 32,
    pmid_splits: Mapping[str, Collection[str]] | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str = "medmentions",
) -> Task:
    """Build a Task from a PubTator corpus and a names file (see the module docstring).

    ``split_rule``: "document" (hash of the PMID, or ``pmid_splits`` when
    given: split name -> PMIDs, e.g. from corpus_pubtator_pmids_trng.txt),
    "mention" or "concept". Annotations whose CUI the names file lacks are
    dropped and counted in ``task.meta["filter"]``.
    """
    corpus_path = Path(corpus_path)
    concepts = read_concept_names(names_path, max_bytes=max_bytes)
    if pmid_splits is not None and (unknown := set(pmid_splits) - set(SPLITS)):
        raise ValueError(f"expected split names among {SPLITS}, got {sorted(unknown)}")
    split_of = {p: s for s, pmids in (pmid_splits or {}).items() for p in pmids}

    queries: list[Query] = []
    n_docs = 0
    for doc in read_pubtator(corpus_path, max_bytes=max_bytes):
        n_docs += 1
        text = doc.text
        if split_rule == "document":
            split = (
                split_of.get(doc.pmid)
                if pmid_splits is not None
                else assign_split(doc.pmid, seed, fractions)
            )
            if split is None:
                continue  # a document outside the given split files
        else:
            split = None
        for a in doc.annotations:
            left, right = _context(text, a.start, a.end, context_words)
            queries.append(
                Query(
                    mention=a.mention,
                    gold=a.cui,
                    left_context=left,
                    right_context=right,
                    split=split,
                )
            )
    if not queries:
        raise DataFormatError("expected at least one annotation, got none", path=corpus_path)

    presplit = split_rule == "document"
    task = assemble_task(
        name,
        concepts,
        queries,
        seed=seed,
        split_rule=split_rule,
        k=k,
        meta={
            "source": corpus_path.name,
            "documents": n_docs,
            "annotations": len(queries),
            "context_words": context_words,
        },
        dedupe=False,
        presplit=presplit,
        fractions=fractions,
    )
    if not task.queries:
        raise DataFormatError(
            "no annotation links to a concept of the names file: expected "
            "CUIs that the names file lists",
            path=corpus_path,
        )
    return task
