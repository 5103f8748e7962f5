"""Deleting what a job leaves: its staged data (recorded in the audit log),
artifacts it wrote but did not commit; and the job row's error text, with no
quoted value of the dataset in it."""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from kronlink.errors import DataFormatError
from kronlink.registry import ArtifactStore, AuditAction, JobInfo, record_audit

if TYPE_CHECKING:
    from worker.job import JobContext

__all__ = ["audit_deleted", "delete_leftover", "delete_staged", "discard", "redact", "write_error"]

log = logging.getLogger("worker.job")


_QUOTED = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")


def redact(error: DataFormatError, staged: Path | None) -> str:
    """The error for the job row, without any text of the dataset.

    Validation messages quote what they found (a split name, a gold id); the
    job row outlives the data, so quoted values are replaced and the file is
    named relative to the staged folder. The uploader saw the full message
    when the service validated the upload.
    """
    path = error.path
    if path is not None and staged is not None:
        try:
            path = Path(path).resolve().relative_to(staged.resolve()).as_posix()
        except ValueError:
            path = Path(path).name
    where = [p for p in (path, error.line and f"line {error.line}") if p]
    if error.field:
        where.append(f"field {error.field}")
    detail = _QUOTED.sub("<value withheld>", error.detail)
    return f"{', '.join(where)}: {detail}" if where else detail


def audit_deleted(ctx: JobContext, job: JobInfo, deleted: dict[str, int], ending: str) -> None:
    with ctx.factory.begin() as s:
        record_audit(
            s,
            AuditAction.DATA_DELETED,
            f"job:{job.id}",
            actor=ctx.owner,
            details={**deleted, "ending": ending},
        )


def delete_leftover(ctx: JobContext, job: JobInfo) -> None:
    """A finished job whose staged data is still there (cancelled while queued,
    or failed by the lease recovery after its worker died)."""
    staged_id = job.payload.get("staged_id")
    if not isinstance(staged_id, str) or "/" in staged_id or not staged_id:
        return
    path = ctx.settings.staging_path / staged_id
    if path.exists():
        audit_deleted(ctx, job, delete_staged(path), job.state.value)


def delete_staged(path: Path) -> dict[str, int]:
    """Remove a staged dataset folder; returns how many files and bytes went."""
    files = size = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file():
                files += 1
                size += p.stat().st_size
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        files, size = 1, path.stat().st_size
        path.unlink(missing_ok=True)
    return {"files": files, "bytes": size}


def discard(store: ArtifactStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            log.warning("could not delete artifact %s", key, exc_info=True)


def write_error(store: ArtifactStore, key: str, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    where = f"; at {exc.filename}" if exc.filename else ""
    return (
        f"cannot write artifact {key} to the artifact folder {store.root_url}: "
        f"[Errno {exc.errno}] {code} {exc.strerror or exc}{where}; nothing was committed "
        "and the active version is unchanged: free space or make the folder writable, "
        "then submit a new job"
    )
