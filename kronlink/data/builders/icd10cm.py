"""The ICD-10-CM task, built offline from the tabular XML that the
``simple-icd-10-cm`` package ships.

- Concepts: every ``<diag>`` element (categories, subcategories and billable
  leaf codes alike; 46,881 in the April 2026 release). Non-leaf codes are kept
  because inclusion terms are attached to them too, and a linker that can only
  name leaves could not answer those. Name = ``<desc>``. Codes formed with a 7th character
  (``<sevenChrDef>``, e.g. S00.01XA) are not in the XML as elements and are
  left out.
- Mentions: the ``<inclusionTerm><note>`` texts, gold = the code they sit
  under. Left and right context are empty: the XML has no running text, and
  the parent's description would hand the model the answer's neighbourhood,
  which real text does not.
- The ontology's synonyms are the code's ``<includes>`` notes (what the
  category covers: I10's "high blood pressure", I21's "cardiac infarction";
  a few are scope statements such as "infection due to any Salmonella species
  other than S. typhi", which no mention equals and BM25 weighs down by their
  length) and the inclusion terms that no split uses as a query (those beyond
  ``limit`` or dropped by the mention filter): the builder removes every
  query string from the stored ontology (issue 12, item 0). Before 2026-12 the
  includes notes were stored as the definition, which nothing searches, so
  "high blood pressure" found no I10.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

from kronlink.data.builders._assemble import assemble_task
from kronlink.data.builders._packages import package_folder
from kronlink.data.schema import Concept, Query, Task

__all__ = ["build_icd10cm", "icd10cm_tabular_path", "parse_icd10cm"]


def icd10cm_tabular_path() -> Path:
    """The tabular XML inside the installed ``simple_icd_10_cm`` package."""
    folder = package_folder("simple_icd_10_cm") / "data"
    # The newest release when several are present (names carry the date).
    matches = sorted(folder.glob("icd10c-tabular-*.xml"))
    if not matches:
        raise FileNotFoundError(f"no icd10c-tabular-*.xml in {folder}")
    return matches[-1]


def _text(el: ET.Element | None) -> str:
    return " ".join((el.text or "").split()) if el is not None else ""


def parse_icd10cm(path: str | Path) -> tuple[list[Concept], list[Query]]:
    """Concepts (with their inclusion terms as synonyms) and (unsplit)
    mentions from a tabular XML file, in file order."""
    concepts: list[Concept] = []
    mentions: list[Query] = []
    root = ET.parse(path).getroot()
    for diag in root.iter("diag"):
        code = _text(diag.find("name"))
        desc = _text(diag.find("desc"))
        if not code or not desc:
            continue
        includes = [_text(n) for inc in diag.findall("includes") for n in inc.findall("note")]
        terms = [_text(n) for t in diag.findall("inclusionTerm") for n in t.findall("note")]
        terms = [t for t in terms if t]
        # Includes notes are synonyms too, never queries (they give no query
        # of their own): I10's "high blood pressure", E11's "diabetes NOS".
        synonyms = tuple(dict.fromkeys(terms + [i for i in includes if i]))
        concepts.append(Concept(id=code, name=desc, synonyms=synonyms))
        mentions.extend(Query(mention=t, gold=code) for t in terms)
    return concepts, mentions


def build_icd10cm(
    seed: int = 0,
    split_rule: str = "mention",
    k: int = 25,
    limit: int | None = None,
    *,
    path: str | Path | None = None,
) -> Task:
    """Build the ICD-10-CM task (see the module docstring for what it contains).

    ``limit`` keeps the first ``limit`` inclusion terms (before filtering), for
    quick runs; the ontology is always complete.
    """
    started = time.perf_counter()
    source = Path(path) if path is not None else icd10cm_tabular_path()
    concepts, mentions = parse_icd10cm(source)
    if limit is not None:
        # Fewer queries, never fewer concepts: a cut ontology would make
        # retrieval artificially easy.
        mentions = mentions[:limit]
    task = assemble_task(
        "icd10cm",
        concepts,
        mentions,
        seed=seed,
        split_rule=split_rule,
        k=k,
        meta={"source": source.name, "raw_mentions": len(mentions), "limit": limit},
    )
    task.meta["build_seconds"] = round(time.perf_counter() - started, 3)
    return task
