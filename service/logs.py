"""Structured logs with a request id.

Each request gets an id (the caller's ``X-Request-ID`` when it is a sane
token, else a new one); it is returned in the response header, carried by a
context variable, and added to every log record made while the request runs.
``configure_logging`` is called once per server process by
``service.app.app_from_env`` (what ``kronlink serve`` starts); ``create_app``
itself never configures logging.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

__all__ = [
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "new_request_id",
    "request_id_var",
]

request_id_var: ContextVar[str | None] = ContextVar("kronlink_request_id", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# attributes every LogRecord has: anything else came from ``extra=``
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


def current_request_id() -> str | None:
    return request_id_var.get()


def new_request_id(given: str | None) -> str:
    """The caller's id when it is a short token (it lands in logs), else a fresh one."""
    if given and _SANE_ID.match(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(fmt: str = "json", level: int | str = logging.INFO) -> None:
    """Root logging for a service process: JSON (or plain text) on stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own access log would duplicate ours (which has the request id)
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
