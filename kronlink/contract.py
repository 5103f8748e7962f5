"""The contract between whoever submits update jobs and the worker that runs them.

The submitter (``kronlink submit``, the service) never imports ``worker/``: it
stores an :class:`UpdateJobSpec` in the job row, then enqueues the task named
:data:`UPDATE_TASK` with an :class:`UpdateMessage` as keyword arguments. Both
carry ids and settings only, never data: the dataset waits in the staging
folder under ``staged_id`` and is deleted when the job ends.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod

__all__ = ["SWEEP_TASK", "UPDATE_TASK", "UpdateJobSpec", "UpdateMessage", "check_name"]

UPDATE_TASK = "kronlink.update"  # runs one update job: kwargs = UpdateMessage
SWEEP_TASK = "kronlink.sweep"  # deletes stale staged data, recovers lost jobs

_Number = StrictInt | StrictFloat
_STAGED_ID = re.compile(r"^[0-9a-f]{32}$")


MAX_NAME_BYTES = 200  # a name is a file name in the artifact store (NAME_MAX is 255)


def check_name(value: str) -> str:
    """A task, ontology or lineage name that is safe as one path component.

    Names become artifact keys (``states/<lineage>/<attempt>/<task>``,
    ``ontologies/<name>/...``): refused here, at submission, rather than by
    the worker after the training it would have thrown away.
    """
    for sep in ("/", "\\"):
        if sep in value:
            raise ValueError(
                f"contains {sep!r}: a name is one path component in the artifact store; "
                "use another character"
            )
    if value.startswith("."):
        raise ValueError("starts with '.': such names are hidden or mean a parent folder")
    bad = next((ch for ch in value if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0), None)
    if bad is not None:
        raise ValueError(f"contains the control character {bad!r}; use printable characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate; send valid Unicode") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"is {size} bytes in UTF-8, over {MAX_NAME_BYTES} bytes: shorten it")
    return value


class UpdateMessage(BaseModel):
    """The broker message: which job to run. Nothing else travels through the broker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: int = Field(gt=0)
    lineage: str = Field(min_length=1, max_length=100)


class UpdateJobSpec(BaseModel):
    """What an update job does, stored as the job row's ``payload``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_name: str = Field(min_length=1, max_length=100)
    staged_id: str  # folder name under the staging dir (uuid4 hex)
    method: PenaltyMethod = DEFAULT_METHOD
    # strict: True and "3" are not numbers here; checked finite and >= 0 below
    lambdas: Literal["auto"] | _Number | list[_Number] = "auto"
    half_decades: bool = False
    quality_gate: float | None = Field(default=None, ge=0, le=1)
    # TrainConfig fields (epochs, batch_size, lr, seed, device...): names checked by the worker
    train: dict[str, Any] = Field(default_factory=dict)
    # Only for version 1 of a lineage: ranker kind and config overrides
    ranker: dict[str, Any] = Field(default_factory=lambda: {"kind": "cnn"})
    ontology: str | None = None  # ontology name recorded in the registry; None: the task name

    @field_validator("task_name", "ontology")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)

    @field_validator("lambdas")
    @classmethod
    def _finite(cls, v: str | float | list[float]) -> str | float | list[float]:
        # Refused at submission: the worker would fail the job only after it was queued.
        if isinstance(v, str):
            return v
        if isinstance(v, list) and not v:
            raise ValueError("expected 'auto', a number or one number per prior task, got []")
        values = v if isinstance(v, list) else [v]
        bad = [x for x in values if not 0 <= x < math.inf]
        if bad:
            raise ValueError(
                f"λ values must be finite numbers >= 0, got {', '.join(map(str, bad))}"
            )
        return [float(x) for x in values] if isinstance(v, list) else float(v)

    @field_validator("staged_id")
    @classmethod
    def _hex_id(cls, v: str) -> str:
        if not _STAGED_ID.match(v):
            raise ValueError(f"expected 32 lowercase hex digits, got {v!r}")
        return v
