"""MedNorm (Belousov et al. 2019) TSV, plus a concept-names file, to a Task.

The corpus file (``mednorm_full.tsv``) is tab-separated with a header line.
Assumed columns, by name (order does not matter, extra columns are ignored):

- ``instance_id``: the instance's id in its source dataset (required);
- ``phrase``: the mention text (required);
- ``original_dataset``: the source dataset, e.g. CADEC or TwADR-L (optional);
- the target column chosen with ``target`` (required): by default
  ``single_mapped_meddra_codes``; ``single_mapped_sct_ids`` links to SNOMED
  CT instead, and ``mapped_meddra_codes`` / ``mapped_sct_ids`` /
  ``meddra_code`` / ``sct_id`` / ``umls_cui`` work too.

A target cell may hold several ids separated by ``,``, ``|``, ``;`` or spaces:
such a phrase links to several concepts and is dropped (counted as
``ambiguous``), as is a row with an empty target (``no_target``). A trailing
``.0`` (a spreadsheet's float rendering of a MedDRA code) is removed.
MedNorm has no context (phrases only) and repeats phrases, so repeats of a
(phrase, concept) pair are dropped before splitting. Concept names come from a
user-supplied names file (MedDRA and SNOMED CT are licensed): see
:mod:`kronlink.data.readers._names`.
"""

from __future__ import annotations

import re
from pathlib import Path

from kronlink.data._lines import text_lines
from kronlink.data.builders._assemble import assemble_task
from kronlink.data.io import DEFAULT_MAX_BYTES
from kronlink.data.readers._names import read_concept_names
from kronlink.data.schema import Query, Task
from kronlink.data.splits import DEFAULT_FRACTIONS
from kronlink.errors import DataFormatError

__all__ = ["DEFAULT_TARGET", "read_mednorm", "read_mednorm_rows"]

DEFAULT_TARGET = "single_mapped_meddra_codes"
_ID_SEPARATORS = re.compile(r"[,|;\s]+")


def read_mednorm_rows(
    path: str | Path,
    target: str = DEFAULT_TARGET,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[Query], dict[str, int]]:
    """Unsplit queries (one per row with exactly one target id) and drop counts."""
    path = Path(path)
    header: list[str] | None = None
    queries: list[Query] = []
    dropped = {"no_target": 0, "ambiguous": 0}
    for lineno, line in text_lines(path, max_bytes):
        if not line.strip():
            continue
        cols = line.split("\t")
        if header is None:
            header = [c.strip() for c in cols]
            missing = [c for c in ("instance_id", "phrase", target) if c not in header]
            if missing:
                raise DataFormatError(
                    f"expected header columns {missing}, got {header}",
                    path=path,
                    line=lineno,
                    field=missing[0],
                )
            i_phrase, i_target = header.index("phrase"), header.index(target)
            continue
        if len(cols) != len(header):
            raise DataFormatError(
                f"expected {len(header)} tab-separated columns as in the header, got {len(cols)}",
                path=path,
                line=lineno,
            )
        phrase = cols[i_phrase].strip()
        if not phrase:
            raise DataFormatError(
                "expected a mention, got an empty column", path=path, line=lineno, field="phrase"
            )
        ids = [re.sub(r"\.0$", "", x) for x in _ID_SEPARATORS.split(cols[i_target].strip()) if x]
        if not ids:
            dropped["no_target"] += 1
        elif len(set(ids)) > 1:
            dropped["ambiguous"] += 1
        else:
            queries.append(Query(mention=phrase, gold=ids[0]))
    if header is None:
        raise DataFormatError("expected a header line, got an empty file", path=path)
    return queries, dropped


def read_mednorm(
    corpus_path: str | Path,
    names_path: str | Path,
    *,
    target: str = DEFAULT_TARGET,
    split_rule: str = "mention",
    seed: int = 0,
    k: int = 25,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str = "mednorm",
) -> Task:
    """Build a Task from a MedNorm TSV and a names file (see the module docstring)."""
    corpus_path = Path(corpus_path)
    concepts = read_concept_names(names_path, max_bytes=max_bytes)
    queries, dropped = read_mednorm_rows(corpus_path, target, max_bytes=max_bytes)
    if not queries:
        raise DataFormatError(
            f"expected rows with a {target!r} id, got none", path=corpus_path, field=target
        )
    task = assemble_task(
        name,
        concepts,
        queries,
        seed=seed,
        split_rule=split_rule,
        k=k,
        meta={
            "source": corpus_path.name,
            "target": target,
            "rows": len(queries),
            "read_dropped": dropped,
        },
        dedupe=True,
        fractions=fractions,
    )
    if not task.queries:
        raise DataFormatError(
            "no row links to a concept of the names file: expected "
            f"{target} ids that the names file lists",
            path=corpus_path,
        )
    return task
