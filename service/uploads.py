"""Streaming a multipart dataset upload into the staging folder.

The body is parsed as it arrives (``python-multipart``'s streaming parser):
file parts go straight to files under ``staging/.upload-<id>/``, never whole
into memory, and a file over ``max_file_bytes`` ends the request with 413 at
the byte that crossed the limit. An archive or compressed stream (zip, gzip,
xz ...; by its first bytes) or a compressed body (``Content-Encoding``) ends
it with 415: nothing is ever unpacked. Form fields are small and kept in memory
(at most ``MAX_FIELD_BYTES`` each). Whatever fails, the folder is removed.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.problems import FieldError, ProblemError

__all__ = ["FILE_PARTS", "MAX_FIELD_BYTES", "Upload", "receive_upload", "sweep_uploads"]

log = logging.getLogger(__name__)

# form part name -> file name in the task folder
FILE_PARTS = {"queries": "queries.jsonl", "ontology": "ontology.jsonl"}
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
# Leading bytes of archives and compressed streams: refused at the first
# chunk, never unpacked (a zip bomb costs its compressed size and no more).
_ARCHIVES = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "a zip archive"),
    (b"\x1f\x8b", "a gzip stream"),
    (b"BZh", "a bzip2 stream"),
    (b"\xfd7zXZ\x00", "an xz stream"),
    (b"(\xb5/\xfd", "a zstd stream"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"Rar!\x1a\x07", "a rar archive"),
)
_MAGIC_BYTES = max(len(m) for m, _ in _ARCHIVES)


@dataclass
class Upload:
    folder: Path
    fields: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # part name -> bytes


class _Receiver:
    """Parser callbacks: headers, then a file part's bytes or a field's bytes."""

    def __init__(self, folder: Path, max_file_bytes: int) -> None:
        self.upload = Upload(folder)
        self.max_file_bytes = max_file_bytes
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._file: BinaryIO | None = None
        self._data = bytearray()
        self._fields = 0
        self._head = b""  # a file part's first bytes, until the archive check ran

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._file = None
        self._data = bytearray()
        self._head = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw = options.get(b"name")
        if raw is None:
            raise _bad("a part has no name in its Content-Disposition header")
        self._name = raw.decode("utf-8", "replace")
        if b"filename" in options or self._name in FILE_PARTS:
            if self._name not in FILE_PARTS:
                raise _bad(
                    f"unexpected file part {self._name!r}; expected {', '.join(FILE_PARTS)}",
                    f"form.{self._name}",
                )
            if self._name in self.upload.sizes:
                raise _bad(f"file part {self._name!r} sent twice", f"form.{self._name}")
            self.upload.sizes[self._name] = 0
            self._file = (self.upload.folder / FILE_PARTS[self._name]).open("wb")
        else:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise _bad(f"more than {MAX_FIELDS} form fields")
            if self._name in self.upload.fields:
                raise _bad(f"field {self._name!r} sent twice", f"form.{self._name}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._file is not None:
            size = self.upload.sizes[self._name] + n
            if size > self.max_file_bytes:
                raise ProblemError(
                    413,
                    "payload-too-large",
                    f"file part {self._name!r} exceeds {self.max_file_bytes} bytes "
                    "(KRONLINK_MAX_UPLOAD_BYTES); split the dataset or raise the limit",
                )
            if size - n < _MAGIC_BYTES:
                self._head = (self._head + data[start:end])[:_MAGIC_BYTES]
                if len(self._head) >= _MAGIC_BYTES:
                    self._refuse_archive()
            self.upload.sizes[self._name] = size
            self._file.write(data[start:end])
        else:
            if len(self._data) + n > MAX_FIELD_BYTES:
                raise _bad(
                    f"field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes", f"form.{self._name}"
                )
            self._data += data[start:end]

    def _refuse_archive(self) -> None:
        kind = next((k for magic, k in _ARCHIVES if self._head.startswith(magic)), None)
        if kind is not None:
            name, file = self._name, FILE_PARTS[self._name]
            raise ProblemError(
                415,
                "unsupported-media-type",
                f"file part {name!r} is {kind}; archives and compressed files are not "
                f"accepted (nothing was unpacked): upload {file} uncompressed, as UTF-8 JSONL",
                errors=[FieldError(loc=f"form.{name}", message=f"{kind}, not JSONL")],
            )

    def on_part_end(self) -> None:
        if self._file is not None:
            if len(self._head) < _MAGIC_BYTES:
                self._refuse_archive()  # a part shorter than the longest magic
            self._file.close()
            self._file = None
        else:
            try:
                self.upload.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"field {self._name!r} is not UTF-8", f"form.{self._name}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _bad(detail: str, loc: str = "form") -> ProblemError:
    return ProblemError(
        422, "validation-error", detail, errors=[FieldError(loc=loc, message=detail)]
    )


async def receive_upload(request: Request, staging: Path, *, max_file_bytes: int) -> Upload:
    """Parse the request's multipart body into a new folder under ``staging``."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise ProblemError(
            415,
            "unsupported-media-type",
            "expected multipart/form-data with the parts queries and ontology (files) and "
            f"task (field), got {ctype.decode('latin-1') or 'no Content-Type'}",
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProblemError(
            415,
            "unsupported-media-type",
            f"Content-Encoding {encoding} is not accepted on uploads (nothing is unpacked): "
            "send the multipart body uncompressed",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ProblemError(400, "validation-error", "multipart/form-data without a boundary")
    limit = len(FILE_PARTS) * max_file_bytes + MAX_FIELDS * MAX_FIELD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProblemError(
            413,
            "payload-too-large",
            f"the upload declares {declared} bytes; at most {limit} are accepted "
            f"({max_file_bytes} per file, KRONLINK_MAX_UPLOAD_BYTES)",
        )
    staging.mkdir(parents=True, exist_ok=True)
    folder = staging / f".upload-{uuid.uuid4().hex}"
    folder.mkdir()
    receiver = _Receiver(folder, max_file_bytes)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    ended: list[bool] = []
    callbacks["on_end"] = lambda: ended.append(True)
    try:
        try:
            parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except (ValueError, FormParserError) as exc:
            raise ProblemError(400, "validation-error", f"bad multipart boundary: {exc}") from None
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except FormParserError as exc:
            raise ProblemError(
                400,
                "validation-error",
                f"malformed multipart body: {exc}; send multipart/form-data as HTTP "
                "clients build it (at most 8 headers of 4 kB per part, names under 4 kB)",
            ) from None
        if not ended:  # the body stopped before the closing boundary
            raise ProblemError(
                400,
                "validation-error",
                "truncated multipart body: it ended before the closing boundary "
                f"(--{boundary.decode('latin-1')}--); send the whole body",
            )
        missing = [p for p in FILE_PARTS if p not in receiver.upload.sizes]
        if missing:
            raise ProblemError(
                422,
                "validation-error",
                f"missing file part(s): {', '.join(missing)} (queries.jsonl and ontology.jsonl)",
                errors=[FieldError(loc=f"form.{p}", message="missing file") for p in missing],
            )
    except BaseException:  # a ProblemError, a client gone away, a cancellation
        receiver.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return receiver.upload


def sweep_uploads(staging: Path, older_than_s: float = 3600.0) -> int:
    """Remove ``.upload-*`` folders left by a server that died mid-upload.

    The worker's sweep skips hidden names, so these would stay. Only folders
    untouched for ``older_than_s`` go: another replica may be receiving one now.
    """
    if not staging.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for folder in staging.glob(".upload-*"):
        newest = max(
            (p.stat().st_mtime for p in [folder, *folder.rglob("*")] if p.exists()), default=0
        )
        if newest < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d abandoned upload folder(s) from %s", removed, staging)
    return removed
