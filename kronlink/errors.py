"""The exception tree of the core library, in one place.

    KronlinkError
    ├── DataFormatError      a dataset file is malformed (names file, line, field)
    ├── ConfigError          an option or config value is out of range
    ├── CheckpointError      a saved model or curvature state cannot be loaded
    └── UnsupportedModuleError  a module type the curvature code has no rule for

The service maps these to RFC 9457 problems; the CLI prints the message.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataFormatError",
    "KronlinkError",
    "UnsupportedModuleError",
]


class KronlinkError(Exception):
    """Base class of every error the library raises on purpose."""


class DataFormatError(KronlinkError, ValueError):
    """A dataset file does not follow the format of DESIGN.md section 2.

    The message names the file, the 1-based line and the field, and says what
    was expected and what was found, so a user can fix the file without reading
    code.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.detail = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(KronlinkError, ValueError):
    """An option is out of range or inconsistent with another."""


class CheckpointError(KronlinkError):
    """A saved model or curvature state is missing, corrupt or mismatched."""


class UnsupportedModuleError(KronlinkError, TypeError):
    """The curvature estimator met a parameterised module it has no rule for."""
