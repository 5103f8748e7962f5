"""Helpers for the hostile-input suite: what the registry and the disk hold
(to prove a refused request changed nothing), hand-built multipart bodies
(so filenames and headers can be as hostile as a client may send), raw HTTP
over a socket (for bodies that lie about their size or never end), and a
private PostgreSQL database for a module-scoped server."""

from __future__ import annotations

import gzip
import io
import json
import select
import socket
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from service_factories import admin
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

BOUNDARY = "hostile-boundary-7f3a"
# Registry tables and the columns that identify a row's state (timestamps
# such as a lineage's locked_at change under a rolled-back lock and say nothing).
TABLES = {
    "jobs": "id, lineage, state, idempotency_key",
    "model_versions": "id, lineage, number, state, artifact_sha256",
    "tasks": "id, name",
    "ontologies": "id, name",
    "task_states": "id, version_id, task_id",
    "audit_log": "id, action, subject, actor",
}
DB_FILES = ("kronlink.db", "kronlink.db-wal", "kronlink.db-shm", "kronlink.db-journal")

ONTOLOGY = [
    {"id": "C1", "name": "fever", "synonyms": ["pyrexia"]},
    {"id": "C2", "name": "asthma"},
    {"id": "C3", "name": "migraine"},
]
CANDS = [{"id": "C1", "name": "fever"}, {"id": "C2", "name": "asthma"}]
QUERIES = [
    {"mention": "high temp", "gold": "C1", "candidates": CANDS, "split": split}
    for split in ("train", "train", "dev", "test")
]


FORM = {"task": "fevers", "method": "kfc", "lambda": "10", "epochs": "1"}


def jsonl_bytes(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# -- what the registry and the disk hold --------------------------------------
@dataclass(frozen=True)
class Snapshot:
    rows: dict[str, list[tuple]]
    files: list[str]  # every path under the data folder but the SQLite files

    def diff(self, other: Snapshot) -> dict[str, Any]:
        """What ``other`` (later) has that this one has not, and the reverse."""
        out: dict[str, Any] = {}
        for table, rows in self.rows.items():
            new, gone = set(other.rows[table]) - set(rows), set(rows) - set(other.rows[table])
            if new or gone:
                out[table] = {"new": sorted(new), "gone": sorted(gone)}
        new_f, gone_f = set(other.files) - set(self.files), set(self.files) - set(other.files)
        if new_f or gone_f:
            out["files"] = {"new": sorted(new_f), "gone": sorted(gone_f)}
        return out


def tree(root: Path) -> list[str]:
    """Relative paths of everything under ``root`` (hidden names included)."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name not in DB_FILES)


def snapshot(factory: sessionmaker[Session], root: Path) -> Snapshot:
    rows = {}
    with factory.begin() as s:
        for table, cols in TABLES.items():
            rows[table] = [tuple(r) for r in s.execute(text(f"SELECT {cols} FROM {table}"))]
    return Snapshot(rows, tree(root))


def staged_uploads(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.glob(".upload-*")) if staging.exists() else []


@dataclass
class Env:
    """A live server and what it writes to."""

    url: str
    root: Path  # the whole data folder: registry file, artifacts, staging
    staging: Path
    factory: Any
    sent: list
    version_id: int

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def snap(self) -> Snapshot:
        return snapshot(self.factory, self.root)


def zip_bomb() -> bytes:
    """50 MB of zeros in a 50 kB zip: anything that unpacks it notices."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("queries.jsonl", b"\0" * 50_000_000)
    return buf.getvalue()


@dataclass(frozen=True)
class Upload:
    """A job submission; every part can be replaced by something hostile."""

    form: dict[str, Any] = field(default_factory=lambda: dict(FORM))
    queries: bytes = jsonl_bytes(QUERIES)
    ontology: bytes = jsonl_bytes(ONTOLOGY)
    files: tuple = ()  # extra or replacement parts: (name, filename, content)
    filename: str | bytes = "queries.jsonl"
    headers: dict[str, str] = field(default_factory=dict)
    gzip_body: bool = False  # the whole body gzipped (with Content-Encoding: gzip)

    def body(self) -> tuple[bytes, dict[str, str]]:
        parts = self.files or (
            ("queries", self.filename, self.queries),
            ("ontology", "ontology.jsonl", self.ontology),
        )
        body, ctype = multipart(self.form, parts)
        if self.gzip_body:
            body = gzip.compress(body)
        return body, {**admin(), "content-type": ctype, **self.headers}


# -- problem documents ---------------------------------------------------------
def problem(r: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    """The RFC 9457 body of ``r``, checked: status, media type, kind, a detail."""
    assert r.status_code == status, (r.status_code, r.text[:2000])
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["status"] == status
    if kind is not None:
        assert body["type"] == f"urn:kronlink:problem:{kind}", body
    assert isinstance(body["detail"], str) and len(body["detail"]) >= 20, body
    assert body["request_id"] == r.headers["x-request-id"]
    return body


# -- multipart, built by hand --------------------------------------------------
def multipart(
    fields: dict[str, str | bytes],
    files: Iterable[tuple[str, str | bytes, bytes]] | Iterable[tuple[str, str | bytes, bytes, str]],
) -> tuple[bytes, str]:
    """(body, content type). Names, filenames and values go in as given, byte
    for byte: NUL, quotes, slashes and non-ASCII included."""

    def enc(v: str | bytes) -> bytes:
        return v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")

    out = bytearray()
    for name, value in fields.items():
        out += f"--{BOUNDARY}\r\n".encode()
        out += b'Content-Disposition: form-data; name="' + enc(name) + b'"\r\n\r\n'
        out += enc(value) + b"\r\n"
    for part in files:
        name, filename, content = part[0], part[1], part[2]
        ctype = part[3] if len(part) > 3 else "application/octet-stream"  # type: ignore[misc]
        out += f"--{BOUNDARY}\r\n".encode()
        out += (
            b'Content-Disposition: form-data; name="'
            + enc(name)
            + b'"; filename="'
            + enc(filename)
            + b'"\r\n'
        )
        out += f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={BOUNDARY}"


# -- raw HTTP over a socket ----------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got out before the answer came
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def raw_post(
    url: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    *,
    chunked: bool = False,
    timeout_s: float = 30,
) -> RawResponse:
    """POST ``chunks`` and stop sending as soon as the server answers (or
    closes): what a client streaming a body without end would see."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if chunked:
            head += "Transfer-Encoding: chunked\r\n"
        sock.sendall((head + "\r\n").encode("latin-1"))
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer (or a close) is there: stop sending
            data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"the server took {sent} bytes without answering")
        return _read_response(sock, sent, t0)
    finally:
        sock.close()


def _read_response(sock: socket.socket, sent: int, t0: float) -> RawResponse:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"the connection closed without an answer: {buf!r}")
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return RawResponse(status, headers, body[:length], sent, time.monotonic() - t0)


def endless(chunk: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes in ``chunk``s: as good as endless for a server with a small limit."""
    for _ in range(total // len(chunk)):
        yield chunk
