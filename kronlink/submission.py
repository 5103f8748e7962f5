"""Submitting an update job: validate, stage the dataset, create the job row, enqueue.

Every submitter calls :func:`submit_dataset`: ``kronlink submit`` with a task
folder it copies, the service's ``POST /v1/jobs`` with an upload it streamed
into the staging folder already (``move=True``). Sending the broker message
is the caller's ``enqueue`` (a Celery producer at the edge: the library
imports no Celery); the message is an :class:`~kronlink.contract.UpdateMessage`,
ids only.

    sub = submit_dataset(folder, {"task_name": "hpo", "method": "kfc"},
                         settings=settings, factory=factory, enqueue=send)
    sub.job.id, sub.created

Nothing is staged or stored unless the options and the dataset are valid;
the same dataset with the same options (the idempotency key) gives the same
job, and its second copy is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateJobSpec, UpdateMessage, check_name
from kronlink.data.schema import Task
from kronlink.errors import ConfigError, DataFormatError, KronlinkError
from kronlink.registry import AuditAction, JobInfo, create_job, record_audit
from kronlink.settings import Settings

__all__ = [
    "EnqueueError",
    "Submission",
    "check_lineage",
    "check_options",
    "check_task",
    "dataset_digest",
    "parse_lambdas",
    "submit_dataset",
]


MAX_LINEAGE_CHARS = 100


class EnqueueError(KronlinkError):
    """The job row is stored and queued, but its broker message was not sent.

    Submitting again (same dataset and options) finds the same job and sends
    the message again; a worker's startup sweep also re-sends queued jobs.
    """

    def __init__(self, job: JobInfo, cause: BaseException) -> None:
        super().__init__(
            f"job {job.id} is queued but the broker refused its message "
            f"({type(cause).__name__}: {cause}); submit again to re-send it"
        )
        self.job = job


@dataclass(frozen=True)
class Submission:
    job: JobInfo
    created: bool  # False: an earlier submission with this idempotency key
    staged_id: str  # where the data waits (the earlier one's when not created)


def parse_lambdas(text: str) -> float | tuple[float, ...] | str:
    """``"auto"``, one number, or one per prior task: ``"10,1000"``."""
    if text.strip() == "auto":
        return "auto"
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"lambda: expected 'auto', a number or numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def dataset_digest(path: Path) -> str:
    """sha256 over a folder's file names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def check_lineage(lineage: str) -> str:
    """A lineage name is a path component of artifact keys (``versions/<lineage>/...``)
    and at most 100 characters (the registry's column): refused before anything is staged."""
    if not 1 <= len(lineage) <= MAX_LINEAGE_CHARS:
        raise ConfigError(
            f"lineage: expected 1 to {MAX_LINEAGE_CHARS} characters, got {len(lineage)}"
        )
    try:
        return check_name(lineage)
    except ValueError as exc:
        raise ConfigError(f"lineage {lineage!r} {exc}") from None


def check_options(options: Mapping[str, Any]) -> UpdateJobSpec:
    """The job's options as an :class:`UpdateJobSpec` (with a placeholder
    ``staged_id``), refused with a :class:`ConfigError` before anything is
    staged: unknown or out-of-range training options, an unknown ranker."""
    from kronlink.models import RANKERS
    from kronlink.models._checkpoint import config_from_dict
    from kronlink.training import TrainConfig

    try:
        spec = UpdateJobSpec(**{**options, "staged_id": "0" * 32})
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"job options: {where}") from None
    try:
        config_from_dict(TrainConfig, dict(spec.train))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"train: {exc}") from None
    from kronlink.update import UpdateRequest

    lambdas = tuple(spec.lambdas) if isinstance(spec.lambdas, list) else spec.lambdas
    UpdateRequest(  # what the worker builds: each refusal a ConfigError, here and not later
        method=spec.method,
        lambdas=lambdas,
        half_decades=spec.half_decades,
        train=config_from_dict(TrainConfig, dict(spec.train)),
        quality_gate=spec.quality_gate,
    )
    ranker = dict(spec.ranker)
    kind = ranker.pop("kind", "cnn")
    if kind not in RANKERS:
        raise ConfigError(f"ranker.kind: expected one of {sorted(RANKERS)}, got {kind!r}")
    try:
        config_from_dict(RANKERS[kind][1], ranker)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ranker: {exc}") from None
    return spec


def check_task(task: Task, folder: Path) -> None:
    """Refuse a task an update cannot run on (its file parses, but the worker
    would fail it after the job was queued): it needs queries in each of
    train, dev and test."""
    from kronlink.data.io import QUERIES_FILE
    from kronlink.data.schema import SPLITS

    sizes = {sp: len(task.split(sp)) for sp in SPLITS}
    if all(sizes.values()):
        return
    unsplit = sum(1 for q in task.queries if q.split is None)
    got = ", ".join(f"{sp} {n}" for sp, n in sizes.items())
    raise DataFormatError(
        f"an update job needs queries in each of train, dev and test; got {got}"
        + (f" (and {unsplit} without a split)" if unsplit else "")
        + ": set each query's split",
        path=folder / QUERIES_FILE,
        field="split",
    )


def submit_dataset(
    source: Path,
    options: Mapping[str, Any],
    *,
    settings: Settings,
    factory: sessionmaker[Session],
    enqueue: Callable[[UpdateMessage], None],
    lineage: str = "main",
    idempotency_key: str | None = None,
    actor: str = "cli",
    move: bool = False,
) -> Submission:
    """Validate ``source`` (a task folder) and ``options`` (``UpdateJobSpec``
    fields but ``staged_id``), stage the folder, create the job and send it.

    ``move=True`` renames ``source`` into place (it must lie in the staging
    folder; the service streams uploads there) and removes it whenever the
    submission does not keep it; otherwise ``source`` is copied and left.
    Raises :class:`ConfigError` or :class:`~kronlink.errors.DataFormatError`
    before anything is stored, :class:`EnqueueError` after the job is stored.
    """
    from kronlink.data.io import load_task

    staging = settings.staging_path
    try:
        check_lineage(lineage)
        if not source.is_dir():
            raise ConfigError(f"dataset: expected a task folder (task.json, ...), got {source}")
        check_options(options)
        # refuse bad input before staging
        check_task(load_task(source, max_bytes=settings.max_upload_bytes), source)
        digest = dataset_digest(source)
        staged_id = uuid.uuid4().hex
        spec = UpdateJobSpec(**{**options, "staged_id": staged_id})
        key = (
            idempotency_key
            or hashlib.sha256(
                json.dumps(
                    [lineage, digest, spec.model_dump(mode="json", exclude={"staged_id"})],
                    sort_keys=True,
                ).encode()
            ).hexdigest()
        )
        staged = staging / staged_id
        staging.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(source, staged)
        else:
            tmp = staging / f".{staged_id}.part"
            shutil.copytree(source, tmp)
            os.utime(tmp)  # copytree copies the source's times: the sweep ages from staging
            os.replace(tmp, staged)
    except BaseException:
        if move:
            shutil.rmtree(source, ignore_errors=True)
        raise

    try:
        with factory.begin() as s:
            job, created = create_job(
                s,
                lineage=lineage,
                payload=spec.model_dump(mode="json"),
                idempotency_key=key,
                actor=actor,
                retry_ended=idempotency_key is None,  # a derived key: the same data may retry
            )
            if created:
                size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
                record_audit(
                    s,
                    AuditAction.DATA_RECEIVED,
                    f"job:{job.id}",
                    actor=actor,
                    details={"staged_id": staged_id, "bytes": size, "sha256": digest},
                )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # no row refers to it
        raise
    if not created:
        shutil.rmtree(staged, ignore_errors=True)  # the first submission's copy serves
        staged_id = str(job.payload.get("staged_id", ""))
    if created or not job.finished:
        try:
            enqueue(UpdateMessage(job_id=job.id, lineage=lineage))
        except Exception as exc:
            raise EnqueueError(job, exc) from exc
    return Submission(job=job, created=created, staged_id=staged_id)
