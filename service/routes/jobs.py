"""Update jobs: submit a dataset (``POST /v1/jobs``), follow it, cancel it. Admin only.

A submission is validated at once, before anything is stored: the form
options (method, λ, training settings), then the dataset files themselves
(``kronlink.data`` validation, with file, line and field). It is then staged
and enqueued exactly as ``kronlink submit`` does (``kronlink.submission``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select

from kronlink.contract import check_name
from kronlink.errors import ConfigError, DataFormatError
from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod
from kronlink.registry import ConflictError, JobState, get_job, list_jobs, request_cancel
from kronlink.registry.models import ModelVersion
from kronlink.submission import EnqueueError, parse_lambdas, submit_dataset
from service.deps import AdminDep, StateDep
from service.problems import FieldError, ProblemError, problem_responses
from service.schemas import MAX_DB_ID, JobOut, valid_text
from service.uploads import FILE_PARTS, receive_upload

__all__ = ["router"]

router = APIRouter(tags=["jobs"])

JobId = Annotated[int, PathParam(ge=1, le=MAX_DB_ID, description="job id")]


class JobForm(BaseModel):
    """The form fields of a job submission (files: queries, ontology)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task: str = Field(min_length=1, max_length=100, description="task name to record")
    method: PenaltyMethod = DEFAULT_METHOD
    lambda_: str = Field(
        default="auto", alias="lambda", description="'auto', a number, or one per prior: 10,1000"
    )
    half_decades: bool = False
    quality_gate: float | None = Field(default=None, ge=0, le=1)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    batch_size: int | None = Field(default=None, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    train: str | None = Field(default=None, description="TrainConfig fields, a JSON object")
    ranker: str | None = Field(default=None, description="version 1 only: ranker, a JSON object")
    lineage: str | None = Field(default=None, min_length=1, max_length=100)
    ontology_name: str | None = Field(default=None, min_length=1, max_length=100)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        return valid_text(v) if isinstance(v, str) else v

    @field_validator("task", "lineage", "ontology_name", mode="after")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)


def _json_object(name: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _form_error(name, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise _form_error(name, f"expected a JSON object, got {type(value).__name__}")
    return value


def _form_error(name: str, message: str) -> ProblemError:
    return ProblemError(
        422,
        "validation-error",
        f"form field {name}: {message}",
        errors=[FieldError(loc=f"form.{name}", message=message)],
    )


def _options(form: JobForm) -> dict[str, Any]:
    try:
        lambdas = parse_lambdas(form.lambda_)
    except ConfigError as exc:
        raise _form_error("lambda", str(exc)) from None
    train = _json_object("train", form.train) or {}
    for key in ("epochs", "batch_size", "lr", "seed"):
        if getattr(form, key) is not None:
            train[key] = getattr(form, key)
    return {
        "task_name": form.task,
        "method": form.method,
        "lambdas": list(lambdas) if isinstance(lambdas, tuple) else lambdas,
        "half_decades": form.half_decades,
        "quality_gate": form.quality_gate,
        "train": train,
        "ranker": _json_object("ranker", form.ranker) or {"kind": "cnn"},
        "ontology": form.ontology_name,
    }


def _dataset_problem(exc: DataFormatError) -> ProblemError:
    """The validation error with the file named as uploaded, not by its staging path."""
    name = Path(exc.path).name if exc.path else None
    part = {v: k for k, v in FILE_PARTS.items()}.get(name or "", name)
    where = [w for w in (name, exc.line and f"line {exc.line}") if w]
    if exc.field:
        where.append(f"field {exc.field}")
    detail = f"{', '.join(where)}: {exc.detail}" if where else exc.detail
    loc = (
        f"form.{part}"
        + (f":{exc.line}" if exc.line else "")
        + (f".{exc.field}" if exc.field else "")
    )
    return ProblemError(
        422,
        "invalid-dataset",
        f"invalid dataset: {detail}; nothing was stored",
        errors=[FieldError(loc=loc, message=exc.detail)],
    )


def _versions(state: Any, job_ids: list[int]) -> dict[int, tuple[int, dict[str, Any]]]:
    """job id -> (id, metrics) of the version it produced."""
    if not job_ids:
        return {}
    with state.factory.begin() as s:
        rows = s.execute(
            select(ModelVersion.job_id, ModelVersion.id, ModelVersion.metrics).where(
                ModelVersion.job_id.in_(job_ids)
            )
        ).all()
    return {j: (v, dict(m or {})) for j, v, m in rows}


# what the document states of each form field: its type and every enforced limit
_SCHEMA_KEYS = ("type", "description", "enum", "anyOf", "minLength", "maxLength")
_SCHEMA_KEYS += ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "default")

_FORM_SCHEMA = {
    "type": "object",
    "required": ["queries", "ontology", "task"],
    "properties": {
        "queries": {
            "type": "string",
            "format": "binary",
            "description": "queries.jsonl: one query a line (DESIGN.md section 2)",
        },
        "ontology": {
            "type": "string",
            "format": "binary",
            "description": "ontology.jsonl: one concept a line",
        },
        **{
            name: {k: v for k, v in prop.items() if k in _SCHEMA_KEYS}
            for name, prop in JobForm.model_json_schema(by_alias=True)["properties"].items()
        },
    },
}


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "The same submission was made before: its job"},
        **problem_responses(400, 401, 403, 413, 415, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}},
        }
    },
    summary="Submit an update job with its dataset",
)
async def submit(
    request: Request,
    response: Response,
    state: StateDep,
    _: AdminDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Upload ``queries`` (JSONL) and ``ontology`` (JSONL) with the job's options.
    The files are validated before the job is stored; the worker deletes them
    when the job ends. Submitting the same files with the same options again
    returns the first job (200) instead of creating one (202)."""
    s = state.settings
    upload = await receive_upload(request, s.staging_path, max_file_bytes=s.max_upload_bytes)
    folder = upload.folder
    try:
        fields = {k: v for k, v in upload.fields.items() if v != ""}  # empty HTML inputs
        try:
            form = JobForm.model_validate(fields)
        except ValidationError as exc:
            errs = [
                FieldError(loc="form." + ".".join(str(p) for p in e["loc"]), message=str(e["msg"]))
                for e in exc.errors()
            ]
            raise ProblemError(
                422,
                "validation-error",
                f"{len(errs)} invalid form field(s); first: {errs[0].loc}: {errs[0].message}",
                errors=errs,
            ) from None
        options = _options(form)
        lineage = form.lineage or s.lineage_names[0]
        header = {"format_version": 1, "name": form.task}
        (folder / "task.json").write_text(json.dumps(header), encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        sub = await asyncio.to_thread(
            submit_dataset,
            folder,
            options,
            settings=s,
            factory=state.factory,
            enqueue=state.enqueue,
            lineage=lineage,
            idempotency_key=form.idempotency_key or idempotency_key,
            actor="api",
            move=True,  # removes the folder whenever the job does not keep it
        )
    except DataFormatError as exc:
        raise _dataset_problem(exc) from None
    except EnqueueError as exc:
        raise ProblemError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None
    if not sub.created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{sub.job.id}"
    return JobOut.of(sub.job)


@router.get(
    "/v1/jobs",
    response_model=list[JobOut],
    responses=problem_responses(401, 403, 422),
    summary="Jobs, newest first",
)
def jobs(
    state: StateDep,
    _: AdminDep,
    job_state: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
        Query(alias="state"),
    ] = None,
    lineage: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobOut]:
    with state.factory.begin() as s:
        rows = list_jobs(s, lineage, JobState(job_state) if job_state else None)
    rows = rows[::-1][:limit]
    versions = _versions(state, [j.id for j in rows])
    return [JobOut.of(j, versions.get(j.id)) for j in rows]


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    responses=problem_responses(401, 403, 404, 422),
    summary="One job: state, phase, progress, metrics, error",
)
def job(job_id: JobId, state: StateDep, _: AdminDep) -> JobOut:
    with state.factory.begin() as s:
        j = get_job(s, job_id)
    return JobOut.of(j, _versions(state, [j.id]).get(j.id))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    status_code=202,
    responses=problem_responses(401, 403, 404, 409, 422),
    summary="Cancel a job",
)
def cancel(job_id: JobId, state: StateDep, _: AdminDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next check
    (``cancel_requested``); a finished one cannot be cancelled (409). The worker
    deletes the job's data in every case."""
    with state.factory.begin() as s:
        before = get_job(s, job_id)
        if before.finished:
            raise ConflictError(
                f"job {job_id} has already {before.state.value}; only a queued or running "
                "job can be cancelled"
            )
        j = request_cancel(s, job_id, actor="api")
    return JobOut.of(j, _versions(state, [j.id]).get(j.id))
