"""Errors as RFC 9457 problem details, mapped in one place.

Every error response is ``application/problem+json``::

    {"type": "urn:kronlink:problem:validation-error", "title": "Invalid request",
     "status": 422, "detail": "...", "instance": "/v1/link", "request_id": "...",
     "errors": [{"loc": "body.candidates[2].id", "message": "..."}]}

``type`` names the kind of problem (docs/service.md lists them); 4xx means
the caller can fix the request, 5xx that the service cannot answer now. A
500 is only ever an internal fault, logged with its request id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kronlink.errors import CheckpointError, ConfigError, DataFormatError, KronlinkError
from kronlink.registry import ConflictError, InvalidTransitionError, NotFoundError
from service.logs import current_request_id

__all__ = [
    "PROBLEM_JSON",
    "FieldError",
    "Problem",
    "ProblemError",
    "install_handlers",
    "problem_responses",
]

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE = "urn:kronlink:problem:"

# slug -> title; the status comes with each raise
TITLES = {
    "malformed-json": "Malformed JSON",
    "validation-error": "Invalid request",
    "invalid-dataset": "Invalid dataset",
    "unauthorized": "Missing or wrong bearer token",
    "forbidden": "Not allowed",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "conflict": "Conflict",
    "corrupt-artifact": "Corrupt artifact",
    "payload-too-large": "Request too large",
    "unsupported-media-type": "Unsupported media type",
    "too-many-requests": "Too many requests",
    "no-model": "No model to answer with",
    "unavailable": "Service unavailable",
    "internal-error": "Internal error",
    "http-error": "HTTP error",
}


class FieldError(BaseModel):
    loc: str = Field(description="where: body.items[2].mention, query.limit, form.task ...")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="urn:kronlink:problem:<kind>; docs/service.md lists the kinds")
    title: str
    status: int
    detail: str = Field(description="what went wrong and how to fix it")
    instance: str | None = Field(default=None, description="the request path")
    request_id: str | None = Field(default=None, description="as in the X-Request-ID header")
    errors: list[FieldError] | None = Field(
        default=None, description="per field, for validation errors"
    )


class ProblemError(Exception):
    """Raise anywhere in a request: becomes a problem response."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.headers = headers or {}
        self.title = title or TITLES.get(kind, "Error")


def problem_response(request: Request | None, exc: ProblemError) -> JSONResponse:
    body: dict[str, Any] = {
        "type": _TYPE + exc.kind,
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "instance": request.url.path if request is not None else None,
        "request_id": current_request_id(),
    }
    if exc.errors:
        body["errors"] = [e.model_dump() for e in exc.errors]
    return JSONResponse(body, status_code=exc.status, headers=exc.headers, media_type=PROBLEM_JSON)


def _loc(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _safe(text: str) -> str:
    # A message may quote the offending input, which can hold lone surrogates
    # that no JSON encoder can write as UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message(error: dict[str, Any]) -> str:
    if error.get("type") == "string_unicode":
        # pydantic's own words ("unable to parse raw data") do not say what to fix
        return (
            "contains an unpaired surrogate (a \\ud800-\\udfff escape without its pair); "
            "send valid Unicode"
        )
    return str(error.get("msg", ""))


def validation_problem(exc: RequestValidationError) -> ProblemError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return ProblemError(
            400,
            "malformed-json",
            f"the body is not valid JSON ({_safe(str(reason))}); send one JSON object",
        )
    fields = [
        FieldError(loc=_safe(_loc(e.get("loc", ()))), message=_safe(_message(e))) for e in errors
    ]
    first = fields[0] if fields else None
    detail = (
        f"{len(fields)} invalid field(s); first: {first.loc}: {first.message}"
        if first
        else "invalid request"
    )
    return ProblemError(422, "validation-error", detail, errors=fields)


def from_library(exc: KronlinkError) -> ProblemError:
    """The library's errors that a caller's input can cause."""
    if isinstance(exc, NotFoundError):
        return ProblemError(404, "not-found", str(exc))
    if isinstance(exc, (InvalidTransitionError, ConflictError)):
        return ProblemError(409, "conflict", str(exc))
    if isinstance(exc, DataFormatError):
        return ProblemError(422, "invalid-dataset", str(exc))
    if isinstance(exc, ConfigError):
        return ProblemError(422, "validation-error", str(exc))
    if isinstance(exc, CheckpointError):
        return ProblemError(503, "unavailable", f"a stored artifact cannot be read: {exc}")
    return ProblemError(409, "conflict", str(exc))


def install_handlers(app: FastAPI) -> None:
    """Map every exception to a problem response (one place, STYLE.md)."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = validation_problem(exc)
        ctype = request.headers.get("content-type", "")
        if problem.errors and problem.errors[0].loc == "body" and "json" not in ctype:
            problem.detail = (
                "the body must be a JSON object sent with Content-Type: application/json, "
                f"got {ctype or 'no Content-Type'}"
            )
        return problem_response(request, problem)

    @app.exception_handler(KronlinkError)
    async def _library(request: Request, exc: KronlinkError) -> JSONResponse:
        return problem_response(request, from_library(exc))

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL restarting, a failover, a full pool: the caller can retry,
        # so 503, not an internal error. The driver's message may name hosts
        # and users: logged, not sent.
        log.warning(
            "registry database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            str(exc).splitlines()[0][:500],
        )
        return problem_response(
            request,
            ProblemError(
                503,
                "unavailable",
                f"the registry database is unavailable ({type(exc).__name__}); loaded "
                "models keep answering /v1/link; retry after Retry-After seconds "
                "(GET /readyz shows the database check)",
                headers={"Retry-After": "5"},
            ),
        )

    for db_error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(db_error, _database)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(
            exc.status_code, "http-error"
        )
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words for any failure of json.loads but a syntax error:
            # the cause says which
            kind = "malformed-json"
            if isinstance(exc.__cause__, RecursionError):
                detail = (
                    "the JSON body is nested too deeply for the parser; "
                    "no request of this API nests more than a few levels"
                )
            else:
                detail = "the body is not UTF-8 text; send one JSON object encoded as UTF-8"
        elif exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path}; GET /docs lists the routes"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            detail = (
                f"{request.method} is not allowed on {request.url.path}; "
                f"allowed: {', '.join(allowed)}"
            )
        return problem_response(
            request, ProblemError(exc.status_code, kind, detail, headers=headers)
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return problem_response(
            request,
            ProblemError(
                500,
                "internal-error",
                "the service failed to answer; the log has the details under this request_id",
            ),
        )


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path, found by asking the routes
    (routers included): Starlette's own 405 names only the first route that
    matched the path."""
    from starlette.routing import Match

    routes = request.app.router.routes
    return [
        m
        for m in _METHODS
        if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)
    ]


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error statuses (and ``default``)."""
    described = {
        400: "Malformed JSON",
        401: "Missing or wrong bearer token",
        403: "Admin routes are disabled (no admin token configured)",
        404: "Not found",
        409: "Conflict with the current state",
        413: "Request too large",
        415: "Unsupported media type",
        422: "Invalid request: field errors",
        429: "Too many queries waiting; retry after the Retry-After header",
        503: "No model loaded yet, or the database is unreachable",
    }
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": Problem, "description": described.get(s, "Error")} for s in statuses
    }
    out["default"] = {"model": Problem, "description": "Any other error (problem JSON)"}
    return out
