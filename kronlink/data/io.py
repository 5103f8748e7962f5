"""Reading, validating and writing task files (DESIGN.md section 2).

A task folder holds ``ontology.jsonl``, ``queries.jsonl`` and ``task.json``.
Every reader validates as it goes and raises :class:`DataFormatError` naming
the file, the 1-based line and the field, with what was expected and what was
found. Readers only ever open files for reading; writers replace a file
atomically (write a sibling, then rename), so a failed write leaves the old
file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kronlink.data._lines import check_size, text_lines
from kronlink.data.schema import SPLITS, Candidate, Concept, Query, Task
from kronlink.errors import DataFormatError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "concept_to_dict",
    "load_task",
    "query_to_dict",
    "read_ontology",
    "read_queries",
    "save_task",
    "write_ontology",
    "write_queries",
]

# Uploads larger than this are refused before a byte is read: the largest real
# task (ICD-10-CM, all codes) is a few tens of MB, so 2 GiB only stops mistakes.
DEFAULT_MAX_BYTES = 2 * 1024**3
FORMAT_VERSION = 1

ONTOLOGY_FILE = "ontology.jsonl"
QUERIES_FILE = "queries.jsonl"
TASK_FILE = "task.json"

# Splits whose queries are trained on: there the gold must be among the given
# candidates (the training protocol inserts it). Dev and test queries carry
# retrieval output as is, so a missing gold is a legitimate retrieval miss.
# ``None`` (no split yet) is treated as training data, the stricter choice.
_GOLD_REQUIRED_SPLITS: frozenset[str | None] = frozenset({"train", None})


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _json_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line."""
    for lineno, text in text_lines(path, max_bytes):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"malformed JSON: {e.msg} at column {e.colno}", path=path, line=lineno
            ) from None
        if not isinstance(obj, dict):
            raise DataFormatError(
                f"expected a JSON object, got {_type_name(obj)}", path=path, line=lineno
            )
        yield lineno, obj


def _check_unicode(f: _Fields, field: str, value: str) -> None:
    """JSON's ``\\ud800`` escapes decode to unpaired surrogates, which no
    tokenizer or UTF-8 writer accepts: refuse them here, not in the worker."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise f.fail(
            field,
            f"contains an unpaired surrogate {value[e.start]!r} at character {e.start + 1}: "
            "expected valid Unicode (a \\ud800-\\udfff escape must be half of a pair)",
        ) from None


class _Fields:
    """Typed field access for one line, raising with file, line and field."""

    def __init__(self, obj: dict[str, Any], path: Path, line: int) -> None:
        self.obj, self.path, self.line = obj, path, line

    def fail(self, field: str, message: str) -> DataFormatError:
        return DataFormatError(message, path=self.path, line=self.line, field=field)

    def string(
        self,
        field: str,
        *,
        required: bool,
        default: str = "",
        nonempty: bool = False,
        value: Any = ...,
    ) -> str:
        """The field's string value; ``value`` checks a nested value instead."""
        if value is ...:
            if field not in self.obj:
                if required:
                    raise self.fail(field, "missing: expected a string")
                return default
            value = self.obj[field]
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {_type_name(value)}")
        _check_unicode(self, field, value)
        if nonempty and not value.strip():
            raise self.fail(field, "expected a non-empty string, got an empty one")
        return value

    def string_list(self, field: str) -> tuple[str, ...]:
        value = self.obj.get(field, [])
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of strings, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{field}[{i}]", f"expected a string, got {_type_name(item)}")
            _check_unicode(self, f"{field}[{i}]", item)
        return tuple(value)


def read_ontology(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Concept]:
    """Read ``ontology.jsonl``: one ``{"id", "name", "synonyms", "definition"}`` a line.

    Raises :class:`DataFormatError` on a malformed line, a missing or ill-typed
    field, a duplicate id, an empty file, invalid UTF-8 or a file over
    ``max_bytes``.
    """
    path = Path(path)
    concepts: list[Concept] = []
    first_line: dict[str, int] = {}
    for lineno, obj in _json_lines(path, max_bytes):
        f = _Fields(obj, path, lineno)
        cid = f.string("id", required=True, nonempty=True)
        if cid in first_line:
            raise f.fail(
                "id",
                f"duplicate concept id {cid!r}: first seen on line "
                f"{first_line[cid]}, expected unique ids",
            )
        first_line[cid] = lineno
        concepts.append(
            Concept(
                id=cid,
                name=f.string("name", required=True, nonempty=True),
                synonyms=f.string_list("synonyms"),
                # null is accepted as "no definition": ontologies exported
                # from databases often write it that way.
                definition=""
                if obj.get("definition") is None
                else f.string("definition", required=False),
            )
        )
    if not concepts:
        raise DataFormatError("empty ontology: expected at least one concept, got none", path=path)
    return concepts


def _read_candidates(f: _Fields, concept_ids: set[str] | None) -> tuple[Candidate, ...] | None:
    value = f.obj.get("candidates")
    if value is None:
        return None
    if not isinstance(value, list):
        raise f.fail("candidates", f"expected a list of objects, got {_type_name(value)}")
    if not value:
        raise f.fail(
            "candidates", "expected at least one candidate (or omit the field), got an empty list"
        )
    out: list[Candidate] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        where = f"candidates[{i}]"
        if not isinstance(item, dict):
            raise f.fail(where, f"expected an object with id and name, got {_type_name(item)}")
        if "id" not in item:
            raise f.fail(f"{where}.id", "missing: expected a string")
        cid = f.string(f"{where}.id", required=True, nonempty=True, value=item["id"])
        name = f.string(f"{where}.name", required=True, value=item.get("name"))
        if cid in seen:
            raise f.fail(
                f"{where}.id",
                f"duplicate candidate {cid!r}: expected each concept at most once per query",
            )
        if concept_ids is not None and cid not in concept_ids:
            raise f.fail(f"{where}.id", f"expected an id of the ontology, got {cid!r}")
        seen.add(cid)
        out.append(Candidate(id=cid, name=name))
    return tuple(out)


def read_queries(
    path: str | Path,
    concept_ids: set[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Query]:
    """Read ``queries.jsonl``: one query a line (see the module docstring of schema).

    ``concept_ids``, when given, are the ontology's ids; gold and candidate ids
    must be among them. For train queries (and queries without a split) the
    gold must be among the given candidates; for dev and test it may be
    absent (a retrieval miss, counted as an error at evaluation).
    """
    path = Path(path)
    queries: list[Query] = []
    for lineno, obj in _json_lines(path, max_bytes):
        f = _Fields(obj, path, lineno)
        mention = f.string("mention", required=True, nonempty=True)
        gold = f.string("gold", required=True, nonempty=True)
        left = f.string("left_context", required=False)
        right = f.string("right_context", required=False)
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise f.fail("split", f"expected one of {', '.join(SPLITS)} or null, got {split!r}")
        if concept_ids is not None and gold not in concept_ids:
            raise f.fail("gold", f"expected an id of the ontology, got {gold!r}")
        candidates = _read_candidates(f, concept_ids)
        if (
            candidates is not None
            and split in _GOLD_REQUIRED_SPLITS
            and all(c.id != gold for c in candidates)
        ):
            raise f.fail(
                "gold",
                f"gold {gold!r} is not among the {len(candidates)} candidates: "
                f"expected it there for {split or 'unsplit'} queries",
            )
        queries.append(
            Query(
                mention=mention,
                gold=gold,
                left_context=left,
                right_context=right,
                candidates=candidates,
                split=split,
            )
        )
    if not queries:
        raise DataFormatError("no queries: expected at least one, got none", path=path)
    return queries


def concept_to_dict(concept: Concept) -> dict[str, Any]:
    return {
        "id": concept.id,
        "name": concept.name,
        "synonyms": list(concept.synonyms),
        "definition": concept.definition,
    }


def query_to_dict(query: Query) -> dict[str, Any]:
    d: dict[str, Any] = {
        "mention": query.mention,
        "left_context": query.left_context,
        "right_context": query.right_context,
    }
    if query.candidates is not None:
        d["candidates"] = [{"id": c.id, "name": c.name} for c in query.candidates]
    d["gold"] = query.gold
    if query.split is not None:
        d["split"] = query.split
    return d


def _atomic_write(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for line in lines:
                out.write(line)
                out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_ontology(path: str | Path, concepts: Iterable[Concept]) -> None:
    _atomic_write(Path(path), (_dumps(concept_to_dict(c)) for c in concepts))


def write_queries(path: str | Path, queries: Iterable[Query]) -> None:
    _atomic_write(Path(path), (_dumps(query_to_dict(q)) for q in queries))


def _sizes(task: Task) -> dict[str, Any]:
    per_split = {s: 0 for s in SPLITS}
    unsplit = 0
    for q in task.queries:
        if q.split is None:
            unsplit += 1
        else:
            per_split[q.split] += 1
    if unsplit:
        per_split["none"] = unsplit
    return {"concepts": len(task.concepts), "queries": per_split}


def save_task(task: Task, directory: str | Path) -> Path:
    """Write a task folder: ontology.jsonl, queries.jsonl and task.json.

    task.json is written last, so a folder with a task.json is complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_ontology(directory / ONTOLOGY_FILE, task.concepts)
    write_queries(directory / QUERIES_FILE, task.queries)
    header = {
        "format_version": FORMAT_VERSION,
        "name": task.name,
        "meta": task.meta,
        "sizes": _sizes(task),
    }
    _atomic_write(directory / TASK_FILE, [json.dumps(header, ensure_ascii=False, indent=2)])
    return directory


def _read_header(path: Path, max_bytes: int) -> dict[str, Any]:
    check_size(path, max_bytes)
    try:
        header = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"invalid UTF-8 at byte {e.start}", path=path) from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"malformed JSON: {e.msg}", path=path, line=e.lineno) from None
    if not isinstance(header, dict):
        raise DataFormatError(f"expected a JSON object, got {_type_name(header)}", path=path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise DataFormatError(
            f"expected format_version {FORMAT_VERSION}, got {version!r}",
            path=path,
            field="format_version",
        )
    if not isinstance(header.get("name"), str) or not header["name"]:
        raise DataFormatError(
            f"expected a non-empty string, got {header.get('name')!r}", path=path, field="name"
        )
    if not isinstance(header.get("meta", {}), dict):
        raise DataFormatError(
            f"expected an object, got {_type_name(header['meta'])}", path=path, field="meta"
        )
    return header


def load_task(directory: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Task:
    """Read and validate a folder written by :func:`save_task` (or by hand).

    task.json's recorded sizes, when present, must match the files: a
    truncated copy is refused rather than trained on.
    """
    directory = Path(directory)
    header = _read_header(directory / TASK_FILE, max_bytes)
    concepts = read_ontology(directory / ONTOLOGY_FILE, max_bytes=max_bytes)
    queries = read_queries(directory / QUERIES_FILE, {c.id for c in concepts}, max_bytes=max_bytes)
    task = Task(
        name=header["name"],
        concepts=tuple(concepts),
        queries=tuple(queries),
        meta=dict(header.get("meta", {})),
    )
    recorded = header.get("sizes")
    if recorded is not None and recorded != _sizes(task):
        raise DataFormatError(
            f"expected the files to match the recorded sizes {recorded}, got {_sizes(task)}",
            path=directory / TASK_FILE,
            field="sizes",
        )
    return task
